"""Cost of the cross-tokenizer pieces: a loss step of ULD and GOLD against the same-tokenizer forward KL, and
the alignment of a batch of blocks.

Loss step = forward and backward of the loss on ``(tokens, V)`` float32 logits (the module's chunk loop does
exactly this per chunk). The student has the shipped teacher's tokenizer (``recipes/teacher``, V = 4,096);
the teacher of GOLD has a byte-level BPE trained here on the other half of the built-in corpus, so the
vocabulary mapping is a real one (``shared_vocabulary``). All variants run interleaved on the same logits.
Alignment: ``CrossTokenizerAligner`` on batches of 16 blocks of 128 student tokens of the built-in corpus.
Run: ``python benchmarks/cross_tokenizer.py [--tokens 2048] [--teacher_vocab 4096 8192]`` (two minutes on
2 CPU cores). ``--teacher_vocab`` is what the teacher's BPE is trained for; the corpus may give fewer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import interleaved_medians, print_table
from transformers import AutoTokenizer

from distilkit.data.corpus import builtin_documents
from distilkit.data.teacher_view import CrossTokenizerAligner
from distilkit.data.tokenizer import train_bpe
from distilkit.data.vocabulary import shared_vocabulary
from distilkit.losses import DistillationLoss, ForwardKLLoss, GOLDLoss, ULDLoss

ROOT = Path(__file__).parents[1]


def loss_step(loss: DistillationLoss, student: torch.Tensor, teacher: torch.Tensor):
    def run() -> None:
        logits = student.clone().requires_grad_(True)
        loss(logits, teacher).backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--teacher_vocab", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    student_tokenizer = AutoTokenizer.from_pretrained(ROOT / "recipes" / "teacher")
    texts = [doc["text"] for doc in builtin_documents("python-reference")]
    vocab = len(student_tokenizer)
    student = torch.randn(args.tokens, vocab) * 2  # (N, V_s)
    same = torch.randn(args.tokens, vocab) * 2  # (N, V_s): a teacher with the student's tokenizer
    t = args.temperature
    variants = {
        "ForwardKL, same tokenizer (reference)": loss_step(ForwardKLLoss(temperature=t), student, same)
    }
    notes = {}
    teachers = {}
    for size in args.teacher_vocab:
        teacher_tokenizer = train_bpe(texts[len(texts) // 2 :], vocab_size=size, show_progress=False)
        mapping = shared_vocabulary(student_tokenizer, teacher_tokenizer)
        teacher = torch.randn(args.tokens, len(teacher_tokenizer)) * 2  # (N, V_t)
        teachers[size] = teacher_tokenizer
        variants[f"ULD, V_t = {len(teacher_tokenizer)}"] = loss_step(ULDLoss(temperature=t), student, teacher)
        gold = GOLDLoss(temperature=t).bind(mapping)
        name = f"GOLD, V_t = {len(teacher_tokenizer)}"
        variants[name] = loss_step(gold, student, teacher)
        notes[name] = f"K = {mapping.shared} shared"
    medians = interleaved_medians(variants, args.repeats, warmup=1)
    base = medians["ForwardKL, same tokenizer (reference)"]
    threads = torch.get_num_threads()
    print(f"loss step (forward + backward), N = {args.tokens}, V_s = {vocab}, T = {t}, threads = {threads}")
    print_table(
        ["loss", "median s", "÷ ForwardKL", "note"],
        [
            [name, f"{medians[name]:.3f}", f"{medians[name] / base:.2f}", notes.get(name, "")]
            for name in variants
        ],
    )
    stream = student_tokenizer(student_tokenizer.eos_token.join(texts), add_special_tokens=False)["input_ids"]
    batches = torch.tensor(stream[: 20 * 16 * 128]).view(20, 16, 128)  # 20 batches of 16 blocks of 128
    rows = []
    for teacher_tokenizer in teachers.values():
        aligner = CrossTokenizerAligner(student_tokenizer, teacher_tokenizer)
        aligner(batches[0])
        start = time.perf_counter()
        views = [aligner(batch) for batch in batches]
        seconds = (time.perf_counter() - start) / len(batches)
        positions = sum(int(view.predicting.sum()) for view in views)
        compared = sum(view.compared for view in views) / positions
        exact = sum(int(view.exact.sum()) for view in views) / positions
        rows.append(
            [
                f"byte-level BPE, V_t = {len(teacher_tokenizer)}",
                f"{seconds * 1000:.1f}",
                f"{compared:.3f}",
                f"{exact:.3f}",
            ]
        )
    print("\nalignment of a batch of 16 x 128 student tokens")
    print_table(["teacher tokenizer", "ms / batch", "positions compared", "of which exact"], rows)


if __name__ == "__main__":
    main()
