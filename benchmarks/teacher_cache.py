"""Offline teacher cache on the quickstart: quality kept, bytes on disk, and what a step costs.

For each variant the quickstart's student (2 x 128) trains for ``--steps`` steps with the quickstart recipe
(``distilkit fit``): no teacher (``recipes/baseline.yaml``), the live teacher (``recipes/quickstart.yaml``),
and the same recipe trained from a cache made by ``distilkit cache`` (top-k K = 8, 32, 64; sampled S = 12).
Reported: the final validation perplexity, the share of live KD's gain over the baseline that it keeps
(gain = baseline ppl - ppl), bytes per token of the cache on disk, the largest decoding error of the cached
log-probabilities against the teacher's, and the training step's cost: every variant's step (forward,
backward, optimizer; the cache's read by block index included) timed interleaved on the same batches,
tokens per second and the ratio to the baseline step. Run:
``python benchmarks/teacher_cache.py [--steps 300] [--output_dir runs/bench-teacher-cache]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
import warnings
from collections.abc import Callable
from itertools import cycle
from pathlib import Path

import torch
from _common import interleaved_medians, print_table

from distilkit import DistillationModule, ForwardKLLoss, TextDataModule
from distilkit.cli import main as distilkit
from distilkit.data.teacher_cache import TeacherCache

ROOT = Path(__file__).parents[1]
QUICKSTART, BASELINE = ROOT / "recipes" / "quickstart.yaml", ROOT / "recipes" / "baseline.yaml"
TEACHER = ROOT / "recipes" / "teacher"
STUDENT = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}
CACHES = {"top-8": ("topk", 8), "top-32": ("topk", 32), "top-64": ("topk", 64), "sample-12": ("sample", 12)}


def make_caches(output: Path) -> dict[str, tuple[Path, float]]:
    """Each cache, made by ``distilkit cache`` on the quickstart recipe (kept when already complete), with
    the seconds the command took (the whole command: start-up included)."""
    made = {}
    for name, (mode, entries) in CACHES.items():
        directory, timing = output / "caches" / name, output / "caches" / f"{name}.seconds"
        if not (directory / "manifest.json").is_file() or not _manifest(directory)["complete"]:
            count = ["--top_k", str(entries)] if mode == "topk" else ["--samples", str(entries)]
            start = time.perf_counter()
            distilkit(
                ["cache", "--config", str(QUICKSTART), "--output_dir", str(directory), "--mode", mode, *count]
            )
            timing.write_text(f"{time.perf_counter() - start:.1f}")
        made[name] = (directory, float(timing.read_text()) if timing.is_file() else float("nan"))
    return made


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def decode_errors(directory: Path, teacher: torch.nn.Module, data: TextDataModule, blocks: int = 24) -> tuple:
    """``(largest |decoded − teacher| log-probability, entries over 0.02 nats, entries, mean tail mass)`` on
    the first ``blocks`` training blocks (temperature 1, as the quickstart's loss)."""
    cache = TeacherCache(directory)
    indices = list(range(blocks))
    items = [data.datasets["train"][i] for i in indices]
    ids = torch.stack([item["input_ids"] for item in items])  # (B, T)
    mask = torch.stack([item["attention_mask"] for item in items])  # (B, T)
    with torch.no_grad():
        log_p = teacher(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (B, T, V)
    targets = cache.targets("train", indices)  # (B, T, K)
    valid = mask.bool()  # positions of real tokens (the padding's logits are stored but never used)
    exact = log_p.gather(-1, targets.ids)[valid]  # (n, K)
    error = (targets.log_probs[valid] - exact).abs()  # (n, K)
    tail = float(targets.tail[valid].exp().mean()) if targets.tail is not None else float("nan")
    return float(error.max()), int((error > 0.02).sum()), error.numel(), tail


def fit(name: str, recipe: Path, output: Path, steps: int, *overrides: str) -> float:
    """The final ``val/ppl`` of a ``distilkit fit`` of ``recipe`` (run once; read back if already done)."""
    run_dir = output / "runs" / name
    if not (run_dir / "metrics.csv").is_file():
        schedule = ["--model.init_args.lr_scheduler.init_args.total_steps", str(steps)]
        place = ["--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(steps)]
        place += ["--trainer.val_check_interval", str(min(100, steps))]
        quiet = ["--trainer.enable_progress_bar", "false"]
        distilkit(["fit", "--config", str(recipe), *place, *quiet, *schedule, *overrides])
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/ppl")]
    return float(rows[-1]["val/ppl"])


def step_timings(data: TextDataModule, caches: dict[str, Path], repeats: int) -> dict[str, float]:
    """Median seconds of one training step of each variant, interleaved, on the same training batches."""
    sizes = {"vocab_size": data.vocab_size, "block_size": data.block_size, "eos_token_id": data.eos_token_id}
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == 8:
            break
    specs: dict[str, dict] = {"baseline": {"teacher": None}, "live KD": {"teacher": str(TEACHER)}}
    specs |= {name: {"teacher": None, "teacher_cache": str(path)} for name, path in caches.items()}

    def step(module: DistillationModule) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(module.student.parameters(), lr=2e-3)
        order = cycle(batches)

        def run() -> None:
            module.compute_loss(next(order))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    variants = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        module = DistillationModule(student=STUDENT, loss=ForwardKLLoss(1.0), kd_ratio=0.5, **spec, **sizes)
        variants[name] = step(module.train())
    return interleaved_medians(variants, repeats, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output_dir", default="runs/bench-teacher-cache")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
    output = Path(args.output_dir)
    caches = make_caches(output)
    data = TextDataModule(
        "builtin:python-reference", tokenizer=str(TEACHER), block_size=128, batch_size=16, val_fraction=0.1
    )
    data.setup()
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    errors = {name: decode_errors(path, teacher, data) for name, (path, _) in caches.items()}

    ppl = {
        "baseline": fit("baseline", BASELINE, output, args.steps),
        "live KD": fit("live", QUICKSTART, output, args.steps),
    }
    for name, (path, _) in caches.items():
        cached = ["--model.init_args.teacher", "null", "--model.init_args.teacher_cache", str(path)]
        ppl[name] = fit(name, QUICKSTART, output, args.steps, *cached)

    medians = step_timings(data, {name: path for name, (path, _) in caches.items()}, args.repeats)
    tokens = 16 * 128
    gain = ppl["baseline"] - ppl["live KD"]
    print(
        f"\nquickstart: teacher {TEACHER.name} (V = {data.vocab_size}), student 2 x 128, {args.steps} steps, "
        f"batch 16 x 128; step timings: median of {args.repeats} interleaved rounds, "
        f"{torch.get_num_threads()} threads"
    )
    rows = []
    for name in ppl:
        kept = "-" if name == "baseline" else f"{100 * (ppl['baseline'] - ppl[name]) / gain:.0f}%"
        on_disk, error, tail, build = "-", "-", "-", "-"
        if name in caches:
            manifest = _manifest(caches[name][0])
            on_disk = f"{manifest['bytes_per_token']:.1f}"
            largest, over, count, tail_mass = errors[name]
            error = f"{largest:.4f} ({over} of {count:,} > 0.02)"
            tail = "-" if tail_mass != tail_mass else f"{100 * tail_mass:.0f}%"
            build = f"{manifest['positions'] / caches[name][1]:,.0f}"
        rows.append(
            [name, f"{ppl[name]:.1f}", kept, on_disk, error, tail, build,
             f"{tokens / medians[name]:,.0f}", f"{medians[name] / medians['baseline']:.2f}"]
        )  # fmt: skip
    print_table(
        ["variant", "val ppl", "gain kept", "bytes/token", "max decode error (nats)", "tail mass",
         "cache pos/s", "train tok/s", "step ÷ baseline"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
