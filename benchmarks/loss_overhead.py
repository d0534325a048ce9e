"""Step overhead of distillation: R = distilkit step / (teacher forward + student step with HF's CE).

The reference is the least a distillation step can cost with transformers alone: the teacher's forward
pass (logits included) plus the student's forward and backward with transformers' own cross-entropy
(``labels=``). The distilkit step does all that and the KD loss. Run: ``python benchmarks/loss_overhead.py``.
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
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    common = {"vocab_size": args.vocab, "block_size": args.seq, "eos_token_id": 0}
    teacher = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4}
    student = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}
    module = DistillationModule(
        student=student, teacher=teacher, loss=ForwardKLLoss(temperature=2.0), **common
    )
    module.eval()  # no dropout, so every variant does the same arithmetic each time
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    auto_chunk = module.chunk_size

    def reference() -> None:
        with torch.no_grad():
            _ = module.teacher(input_ids=ids).logits
        module.student(input_ids=ids, labels=ids).loss.backward()
        module.zero_grad(set_to_none=True)

    def distilkit_step(chunk_size: int | None):
        def step() -> None:
            module.chunk_size = chunk_size
            module.compute_loss(batch)["loss"].backward()
            module.zero_grad(set_to_none=True)

        return step

    variants = {
        "reference": reference,
        "chunked": distilkit_step(auto_chunk),
        "unchunked": distilkit_step(None),
    }
    medians = interleaved_medians(variants, args.repeats)
    base = medians["reference"]
    print(
        f"V={args.vocab}, tokens={args.batch * args.seq}, chunk={auto_chunk}, "
        f"threads={torch.get_num_threads()}"
    )
    print_table(
        ["step", "median s", "R (÷ reference)"],
        [
            ["teacher forward + student step with HF CE (reference)", f"{base:.3f}", "1.00"],
            ["distilkit, chunked (default)", f"{medians['chunked']:.3f}", f"{medians['chunked'] / base:.2f}"],
            [
                "distilkit, unchunked (chunk_size: null)",
                f"{medians['unchunked']:.3f}",
                f"{medians['unchunked'] / base:.2f}",
            ],
        ],
    )


if __name__ == "__main__":
    main()
