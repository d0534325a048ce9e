"""How far one cut (before any distillation) moves the shipped teacher's predictions, depth vs width.

The teacher is ``recipes/teacher`` (GPT-2, 4 layers x 256); importance is measured on 8 batches of 4 x 128
tokens from the start of the built-in corpus, and the numbers on 8 other batches from its end:
KL(teacher || student) in nats per token and the student's perplexity, for cuts of depth only, width
only and both (the quickstart's 2 x 128 student shape), against a random-init student of that shape.
A sanity check of the surgery, not the issue's benchmark (which distils after the cut).
Run: ``python benchmarks/prune_logit_shift.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from _common import print_table
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilkit.data.corpus import builtin_documents
from distilkit.models.pruning import cut_from_teacher

Batch = dict[str, torch.Tensor]


def blocks(tokenizer: Any, texts: list[str], count: int, length: int = 128, rows: int = 4) -> list[Batch]:
    """``count`` batches of ``rows`` x ``length`` tokens of ``texts``, in order."""
    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"])
    ids = ids[: (len(ids) // length) * length].view(-1, length)[: count * rows]  # (count·rows, T)
    return [
        {"input_ids": ids[i : i + rows], "attention_mask": torch.ones_like(ids[i : i + rows])}
        for i in range(0, len(ids), rows)
    ]


@torch.no_grad()
def shift(student: Any, teacher: Any, batches: list[Batch]) -> tuple[float, float]:
    """Mean KL(teacher || student) per next-token position, and the student's perplexity."""
    kl = ce = tokens = 0.0
    for batch in batches:
        ids = batch["input_ids"]
        s = student(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        kl += float((t.exp() * (t - s)).sum())
        ce += float(F.nll_loss(s.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        tokens += ids[:, 1:].numel()
    return kl / tokens, math.exp(ce / tokens)


def main() -> None:
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained("recipes/teacher", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained("recipes/teacher")
    docs = [d["text"] for d in builtin_documents("python-reference")]
    calibration, held_out = blocks(tokenizer, docs[:40], 8), blocks(tokenizer, docs[-20:], 8)
    quickstart = {"n_layer": 2, "n_embd": 128, "n_inner": 512}
    cases: list[tuple[str, dict[str, int], dict[str, Any]]] = [
        ("depth 4 -> 2, layers [0, 2]", {"n_layer": 2}, {"layers": [0, 2]}),
        ("depth 4 -> 2, layers [1, 3]", {"n_layer": 2}, {"layers": [1, 3]}),
        ("depth 4 -> 2, ranked by influence", {"n_layer": 2}, {"calibration": calibration}),
        (
            "depth 4 -> 2, ranked by loss",
            {"n_layer": 2},
            {"calibration": calibration, "layer_ranking": "loss"},
        ),
        ("depth 4 -> 3, ranked", {"n_layer": 3}, {"calibration": calibration}),
        ("n_embd 256 -> 128 (head dim 64 -> 32), magnitude", {"n_embd": 128}, {"importance": "magnitude"}),
        ("n_embd 256 -> 128 (head dim 64 -> 32), activation", {"n_embd": 128}, {"calibration": calibration}),
        (
            "n_embd 256 -> 128, n_head 4 -> 2, activation",
            {"n_embd": 128, "n_head": 2},
            {"calibration": calibration},
        ),
        ("n_inner 1024 -> 512, magnitude", {"n_inner": 512}, {"importance": "magnitude"}),
        ("n_inner 1024 -> 512, activation", {"n_inner": 512}, {"calibration": calibration}),
        ("2 x 128: layers [0, 2] + magnitude", quickstart, {"layers": [0, 2], "importance": "magnitude"}),
        ("2 x 128: ranked by influence + activation", quickstart, {"calibration": calibration}),
        (
            "2 x 128: ranked by loss + activation",
            quickstart,
            {"calibration": calibration, "layer_ranking": "loss"},
        ),
    ]
    _, teacher_ppl = shift(teacher, teacher, held_out)
    rows: list[list[object]] = [
        [
            "teacher",
            f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}",
            "-",
            "0",
            f"{teacher_ppl:.1f}",
        ]
    ]
    for name, targets, options in cases:
        student, report = cut_from_teacher(teacher, targets, **options)
        kl, ppl = shift(student, teacher, held_out)
        rows.append([name, f"{report.params_after / 1e6:.2f}", str(report.layers), f"{kl:.3f}", f"{ppl:.1f}"])
    config = teacher.config.to_dict() | quickstart
    random_student = AutoModelForCausalLM.from_config(type(teacher.config).from_dict(config)).eval()
    kl, ppl = shift(random_student, teacher, held_out)
    params = sum(p.numel() for p in random_student.parameters()) / 1e6
    rows.append(["2 x 128 random init", f"{params:.2f}", "-", f"{kl:.3f}", f"{ppl:.1f}"])
    print_table(["cut", "params (M)", "blocks kept", "KL(t || s) nats/token", "ppl"], rows)


if __name__ == "__main__":
    main()
