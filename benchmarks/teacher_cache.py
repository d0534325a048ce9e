"""Offline teacher cache on the quickstart: quality kept, bytes on disk, and what a step costs.

For each variant the quickstart's student (2 x 128) trains for ``--steps`` steps with the quickstart recipe
(``distilkit fit``) at each of ``--seeds``: no teacher (``recipes/baseline.yaml``), the live teacher
(``recipes/quickstart.yaml``), and the same recipe trained from a cache made by ``distilkit cache``: top-k
(K = 8, 32, 64: the (K+1)-bucket KL), top-k with tail draws (K + S: the head exact, S draws from the tail),
sampled (S = 12, 64). The generalized JSD (β = 0.5) rows train live and from two caches with that loss.
Reported: the final validation perplexity (mean over the seeds), the share of live KD's gain over the
baseline that it keeps at each seed (gain = baseline ppl - ppl, against the live run of the same loss and
seed), bytes per token of the cache on disk, the largest decoding error of the cached log-probabilities
against the teacher's, and the training step's cost: every forward-KL variant's step (forward, backward,
optimizer; the cache's read by block index included) timed interleaved on the same batches, tokens per
second and the ratio to the baseline step. Run:
``python benchmarks/teacher_cache.py [--steps 300] [--seeds 0 1] [--output_dir runs/bench-teacher-cache]``
(``--phase fit`` only trains, so that two seeds can train in two processes; ``--phase report`` then reads
the runs back, times the steps and prints the table; ``--phase time`` only times the steps; ``--variants``
picks the rows, the baseline and live rows their gains are measured against added).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, interleaved_medians, print_table

from distilkit import DistillationModule, ForwardKLLoss, TextDataModule
from distilkit.cli import main as distilkit
from distilkit.data.teacher_cache import TeacherCache
from distilkit.losses import DistillationLoss, SparseTargets
from distilkit.losses.aligned import AlignedLogits
from distilkit.losses.partial import PartialTargets

QUICKSTART, BASELINE = ROOT / "recipes" / "quickstart.yaml", ROOT / "recipes" / "baseline.yaml"
TEACHER = ROOT / "recipes" / "teacher"
STUDENT = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}
#: name -> distilkit cache arguments
CACHES = {
    "top-8": ["--mode", "topk", "--top_k", "8"],
    "top-32": ["--mode", "topk", "--top_k", "32"],
    "top-64": ["--mode", "topk", "--top_k", "64"],
    "top-8+4": ["--mode", "topk", "--top_k", "8", "--tail_samples", "4"],
    "top-16+16": ["--mode", "topk", "--top_k", "16", "--tail_samples", "16"],
    "top-32+32": ["--mode", "topk", "--top_k", "32", "--tail_samples", "32"],
    "sample-12": ["--mode", "sample", "--samples", "12"],
    "sample-64": ["--mode", "sample", "--samples", "64"],
}
GJSD = ["--model.init_args.loss", json.dumps(
    {"class_path": "distilkit.losses.GeneralizedJSDLoss", "init_args": {"beta": 0.5, "temperature": 1.0}}
)]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One row: a run of a recipe, from a cache or not, with a loss; ``live``: the row its gain is against."""

    name: str
    recipe: Path
    cache: str | None = None
    loss: tuple[str, ...] = ()
    live: str = "live KD"


VARIANTS = [
    Variant("baseline", BASELINE, live="-"),
    Variant("live KD", QUICKSTART),
    *(Variant(name, QUICKSTART, cache=name) for name in CACHES),
    Variant("live KD, GJSD", QUICKSTART, loss=tuple(GJSD), live="live KD, GJSD"),
    Variant("sample-12, GJSD", QUICKSTART, cache="sample-12", loss=tuple(GJSD), live="live KD, GJSD"),
    Variant("top-32+32, GJSD", QUICKSTART, cache="top-32+32", loss=tuple(GJSD), live="live KD, GJSD"),
]


def make_caches(output: Path) -> dict[str, tuple[Path, float]]:
    """Each cache, made by ``distilkit cache`` on the quickstart recipe (kept when already complete), with
    the seconds the command took (the whole command: start-up included)."""
    made = {}
    for name, arguments in CACHES.items():
        directory, timing = output / "caches" / name, output / "caches" / f"{name}.seconds"
        if not (directory / "manifest.json").is_file() or not _manifest(directory)["complete"]:
            start = time.perf_counter()
            distilkit(["cache", "--config", str(QUICKSTART), "--output_dir", str(directory), *arguments])
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
    targets = cache.targets("train", indices)  # (B, T, E)
    valid = mask.bool()  # positions of real tokens (the padding's logits are stored but never used)
    exact = log_p.gather(-1, targets.ids)[valid]  # (n, E)
    error = (targets.log_probs[valid] - exact).abs()  # (n, E)
    tail = float(targets.tail[valid].exp().mean()) if targets.tail is not None else float("nan")
    return float(error.max()), int((error > 0.02).sum()), error.numel(), tail


def fit(
    variant: Variant, output: Path, steps: int, seed: int, caches: dict[str, tuple[Path, float]]
) -> float:
    """The final ``val/ppl`` of a ``distilkit fit`` of the variant at ``seed`` (run once, then read back; a
    run that did not finish is run again)."""
    run_dir = output / "runs" / variant.name.replace(", ", "-").replace(" ", "-") / f"seed{seed}"
    if _final_ppl(run_dir, steps) is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        schedule = ["--model.init_args.lr_scheduler.init_args.total_steps", str(steps)]
        place = ["--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(steps)]
        place += ["--trainer.val_check_interval", str(min(100, steps)), "--seed_everything", str(seed)]
        quiet = ["--trainer.enable_progress_bar", "false"]
        cached = []
        if variant.cache is not None:
            path = str(caches[variant.cache][0])
            cached = ["--model.init_args.teacher", "null", "--model.init_args.teacher_cache", path]
        distilkit(["fit", "--config", str(variant.recipe), *place, *quiet, *schedule, *cached, *variant.loss])
    final = _final_ppl(run_dir, steps)
    assert final is not None, f"{run_dir} did not finish"
    return final


def _kept(baseline: float, live: float, ppl: float) -> str:
    """The share of the live run's gain over the baseline that a run keeps, ``(baseline − ppl) / (baseline −
    live)``; none when the live run gained nothing (a share of a loss would read as a gain)."""
    if baseline <= live:
        return f"- (live gained nothing: {live:.1f} >= {baseline:.1f})"
    return f"{100 * (baseline - ppl) / (baseline - live):.0f}%"


def _final_ppl(run_dir: Path, steps: int) -> float | None:
    """The ``val/ppl`` of the validation after the last step, or None when the run has not reached it."""
    if not (run_dir / "metrics.csv").is_file():
        return None
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/ppl")]
    done = rows and int(rows[-1]["step"]) >= steps - 1
    return float(rows[-1]["val/ppl"]) if done else None


class AutogradForwardKL(ForwardKLLoss):
    """Forward KL through autograd on sparse targets (the chunked path before the closed form), for timing."""

    def kd_and_ce(
        self,
        student_logits: torch.Tensor,
        teacher: torch.Tensor | SparseTargets | PartialTargets | AlignedLogits,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(teacher, SparseTargets):
            return DistillationLoss.kd_and_ce(self, student_logits, teacher, labels)
        return super().kd_and_ce(student_logits, teacher, labels)


def step_timings(
    data: TextDataModule, caches: dict[str, Path], repeats: int, autograd: bool = False
) -> dict[str, float]:
    """Median seconds of one training step of each variant, interleaved, on the same training batches;
    ``autograd``: each cache's step also with the sparse loss through autograd (``"<name> (autograd)"``)."""
    sizes: dict[str, Any] = {
        "vocab_size": data.vocab_size,
        "block_size": data.block_size,
        "eos_token_id": data.eos_token_id,
    }
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == 8:
            break
    specs: dict[str, dict] = {"baseline": {"teacher": None}, "live KD": {"teacher": str(TEACHER)}}
    specs |= {name: {"teacher": None, "teacher_cache": str(path)} for name, path in caches.items()}
    if autograd:
        specs |= {
            f"{name} (autograd)": {
                "teacher": None,
                "teacher_cache": str(path),
                "loss": AutogradForwardKL(1.0),
            }
            for name, path in caches.items()
        }

    def step(module: DistillationModule) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(module.student.parameters(), lr=2e-3)
        order = cycle(batches)

        def run() -> None:
            module.compute_loss(next(order))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    variants: dict[str, Callable[[], object]] = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        spec = {"loss": ForwardKLLoss(1.0)} | spec
        module = DistillationModule(student=STUDENT, kd_ratio=0.5, **spec, **sizes)
        variants[name] = step(module.train())
    return interleaved_medians(variants, repeats, warmup=2)


def quickstart_data() -> TextDataModule:
    """The quickstart's data (as the recipes read it), set up."""
    data = TextDataModule(
        "builtin:python-reference", tokenizer=str(TEACHER), block_size=128, batch_size=16, val_fraction=0.1
    )
    data.setup()
    return data


def time_steps(
    variants: list[Variant], caches: dict[str, tuple[Path, float]], repeats: int, threads: int
) -> None:
    """``--phase time``: only the step timings of the forward-KL variants (no training), as a table."""
    data = quickstart_data()
    torch.set_num_threads(threads)
    timed = {v.cache: caches[v.cache][0] for v in variants if v.cache is not None and not v.loss}
    medians = step_timings(data, timed, repeats, autograd=True)
    print(
        f"\nquickstart step timings: batch 16 x 128, median of {repeats} interleaved rounds, "
        f"{torch.get_num_threads()} thread(s)"
    )
    rows: list[list[object]] = []
    for variant in [v for v in VARIANTS if v in variants and v.name in medians and not v.loss]:
        step = medians[variant.name]
        on_disk = (
            "-" if variant.cache is None else f"{_manifest(caches[variant.cache][0])['bytes_per_token']:.1f}"
        )
        rows.append([variant.name, on_disk, f"{16 * 128 / step:,.0f}", f"{step / medians['baseline']:.2f}"])
        reference = medians.get(f"{variant.name} (autograd)")
        if reference is not None:
            ratio = f"{reference / medians['baseline']:.2f}"
            rows.append(
                [f"{variant.name}, loss through autograd", on_disk, f"{16 * 128 / reference:,.0f}", ratio]
            )
    print_table(["variant", "bytes/token", "train tok/s", "step ÷ baseline"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output_dir", default="runs/bench-teacher-cache")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing steps")
    parser.add_argument("--phase", choices=["all", "fit", "report", "time"], default="all")
    parser.add_argument(
        "--variants", nargs="+", default=[v.name for v in VARIANTS], help="the rows, in the order they train"
    )
    args = parser.parse_args()
    unknown = set(args.variants) - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}")
    chosen = {v.name: v for v in VARIANTS}
    variants = [chosen[name] for name in args.variants]
    for needed in {"baseline", *(v.live for v in variants if v.live != "-")} - set(args.variants):
        variants.insert(0, chosen[needed])  # the rows a gain is measured against
    warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
    output = Path(args.output_dir)
    caches = make_caches(output)
    if args.phase == "time":
        return time_steps(variants, caches, args.repeats, args.threads)
    ppl = {(v.name, seed): fit(v, output, args.steps, seed, caches) for v in variants for seed in args.seeds}
    if args.phase == "fit":
        return
    data = quickstart_data()
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    errors = {name: decode_errors(path, teacher, data) for name, (path, _) in caches.items()}
    torch.set_num_threads(args.threads)
    timed = {v.cache: caches[v.cache][0] for v in variants if v.cache is not None and not v.loss}
    medians = step_timings(data, timed, args.repeats)
    tokens = 16 * 128
    print(
        f"\nquickstart: teacher {TEACHER.name} (V = {data.vocab_size}), student 2 x 128, {args.steps} steps, "
        f"seeds {args.seeds}, batch 16 x 128; step timings: median of {args.repeats} interleaved rounds, "
        f"{torch.get_num_threads()} thread(s)"
    )
    rows: list[list[object]] = []
    for variant in [v for v in VARIANTS if v in variants]:  # in the table's order
        name = variant.name
        mean = statistics.mean(ppl[name, seed] for seed in args.seeds)
        kept = "-"
        if variant.live != "-":
            shares = [_kept(ppl["baseline", s], ppl[variant.live, s], ppl[name, s]) for s in args.seeds]
            kept = " / ".join(shares)
        on_disk, error, tail, build = "-", "-", "-", "-"
        if variant.cache is not None:
            manifest = _manifest(caches[variant.cache][0])
            on_disk = f"{manifest['bytes_per_token']:.1f}"
            largest, over, count, tail_mass = errors[variant.cache]
            error = f"{largest:.4f} ({over} of {count:,} > 0.02)"
            tail = "-" if tail_mass != tail_mass else f"{100 * tail_mass:.0f}%"
            build = f"{manifest['positions'] / caches[variant.cache][1]:,.0f}"
        step = medians.get(name if variant.loss == () else "")
        speed = "-" if step is None else f"{tokens / step:,.0f}"
        ratio = "-" if step is None else f"{step / medians['baseline']:.2f}"
        rows.append([name, f"{mean:.1f}", kept, on_disk, error, tail, build, speed, ratio])
    print_table(
        ["variant", "val ppl", "gain kept (per seed)", "bytes/token", "max decode error (nats)", "tail mass",
         "cache pos/s", "train tok/s", "step ÷ baseline"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
