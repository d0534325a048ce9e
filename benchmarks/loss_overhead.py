"""Step overhead of distillation: R = distilkit step / (teacher forward + student step with HF's CE).

The reference is the least a distillation step can cost with transformers alone: the teacher's forward
pass (logits included) plus the student's forward and backward with transformers' own cross-entropy
(``labels=``). The distilkit step does all that and the KD loss. All variants run interleaved on the same
batch and the same weights. Run: ``python benchmarks/loss_overhead.py [--temperature 2]``.
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, print_table

from distilkit import DistillationModule, ForwardKLLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    common = {"vocab_size": args.vocab, "block_size": args.seq, "eos_token_id": 0}
    loss = ForwardKLLoss(temperature=args.temperature)
    teacher = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4}
    student = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}
    eager = DistillationModule(
        student=student, teacher=teacher, loss=loss, **common
    ).eval()  # eval: no dropout
    compiled = DistillationModule(
        student=eager.student, teacher=eager.teacher, loss=loss, compile_loss=True, **common
    ).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    auto_chunk = eager.chunk_size

    def reference() -> None:
        with torch.no_grad():
            _ = eager.teacher(input_ids=ids).logits
        eager.student(input_ids=ids, labels=ids).loss.backward()
        eager.zero_grad(set_to_none=True)

    def step(module: DistillationModule, chunk_size: int | None):
        def run() -> None:
            module.chunk_size = chunk_size
            module.compute_loss(batch)["loss"].backward()
            module.zero_grad(set_to_none=True)

        return run

    variants = {
        "reference": reference,
        "chunked": step(eager, auto_chunk),
        "compiled": step(compiled, auto_chunk),
        "unchunked": step(eager, None),
    }
    medians = interleaved_medians(variants, args.repeats, warmup=2)
    base = medians["reference"]
    print(
        f"ForwardKL T={args.temperature}, V={args.vocab}, tokens={args.batch * args.seq}, "
        f"chunk={auto_chunk}, threads={torch.get_num_threads()}"
    )
    labels = {
        "reference": "teacher forward + student step with HF CE (reference)",
        "chunked": "distilkit, chunked (default)",
        "compiled": "distilkit, chunked, compile_loss: true",
        "unchunked": "distilkit, unchunked (chunk_size: null)",
    }
    print_table(
        ["step", "median s", "R (÷ reference)"],
        [[labels[name], f"{medians[name]:.3f}", f"{medians[name] / base:.2f}"] for name in variants],
    )


if __name__ == "__main__":
    main()
