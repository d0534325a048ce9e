"""Peak memory of one distillation training step (forward + backward): unchunked vs chunked.

Each measurement runs in a fresh subprocess: after building the models and the batch it resets the
process's peak resident set (Linux ``/proc/self/clear_refs``), runs one step, and reports the peak
minus the resident set before the step, i.e. what the step itself needed on top of models and inputs.
Run: ``python benchmarks/loss_memory.py`` (Linux; about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import print_table


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(tokens: int, vocab: int, chunk: str) -> dict[str, float]:
    """One step in this process; returns the step's extra peak memory in MiB."""
    import torch

    from distilkit import DistillationModule, ForwardKLLoss

    torch.manual_seed(0)
    seq = 1024 if tokens >= 1024 else tokens
    batch_size = tokens // seq
    common = {"vocab_size": vocab, "block_size": seq, "eos_token_id": 0}
    module = DistillationModule(
        student={"model_type": "gpt2", "n_layer": 1, "n_embd": 128, "n_head": 2},
        teacher={"model_type": "gpt2", "n_layer": 1, "n_embd": 256, "n_head": 4},
        loss=ForwardKLLoss(temperature=2.0),
        chunk_size=None if chunk == "none" else "auto",
        **common,
    ).eval()
    ids = torch.randint(0, vocab, (batch_size, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _rss_kib("VmRSS")
    module.compute_loss(batch)["loss"].backward()
    peak = _rss_kib("VmHWM")
    return {"extra_mib": (peak - before) / 1024, "chunk_size": module.chunk_size or 0}


def run(tokens: int, vocab: int, chunk: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(tokens), str(vocab), chunk],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("TOKENS", "VOCAB", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        tokens, vocab, chunk = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(measure(tokens, vocab, chunk)))
        return

    tokens, vocab = 4096, 65536
    unchunked, chunked = run(tokens, vocab, "none"), run(tokens, vocab, "auto")
    print(f"One training step, V={vocab}, {tokens} tokens: memory beyond models and inputs")
    print_table(
        ["path", "chunk", "extra peak MiB", "unchunked ÷ chunked"],
        [
            ["unchunked (chunk_size: null)", "-", f"{unchunked['extra_mib']:.0f}", ""],
            [
                "chunked (auto)",
                int(chunked["chunk_size"]),
                f"{chunked['extra_mib']:.0f}",
                f"{unchunked['extra_mib'] / chunked['extra_mib']:.1f}x",
            ],
        ],
    )
    print("\nHow the chunked step's extra memory grows (unchunked beside it for scale)")
    rows = []
    for grid_tokens, grid_vocab in [
        (1024, 65536),
        (4096, 65536),
        (8192, 65536),
        (4096, 16384),
        (4096, 131072),
    ]:
        small = run(grid_tokens, grid_vocab, "auto")
        logits_mib = grid_tokens * grid_vocab * 4 / 2**20
        # Past 1 GiB per logits copy the unchunked step needs over 10 GiB: not run on a 24 GiB machine.
        full = (
            f"{run(grid_tokens, grid_vocab, 'none')['extra_mib']:.0f}" if logits_mib <= 1024 else "(not run)"
        )
        rows.append([grid_tokens, grid_vocab, f"{logits_mib:.0f}", f"{small['extra_mib']:.0f}", full])
    print_table(["tokens", "V", "one fp32 logits copy MiB", "chunked extra MiB", "unchunked extra MiB"], rows)


if __name__ == "__main__":
    main()
