"""On-policy distillation at equal steps: lmbda 0 (KD on the data only), 0.5 and 1, and the teacher and mixed
samplers, on the quickstart (shipped teacher, 2x128 student, 300 steps, ``recipes/on_policy.yaml``).

For each run, from its ``metrics.csv``: the last validation's ``val/sample_teacher_nll`` (mean NLL the
teacher gives the student's samples of 64 tokens after 32-token validation prompts), ``val/sample_distinct2``
and ``val/ppl``; the training throughput (data tokens per second, Lightning's ``ThroughputMonitor`` through
``distilkit.callbacks.TokenThroughput``, validation left out) and the mean ``train/generation_share`` of the
sampled steps. A last row scores the teacher's own samples (``distilkit validate`` with the teacher as the
student): the values a student that writes exactly like the teacher would reach.

Run: ``python benchmarks/on_policy.py [--steps 300] [--only NAME ...]`` (runs one after another; about
30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, print_table

from distilkit.cli import main as distilkit

RECIPE = ["--config", "recipes/on_policy.yaml"]
NO_WARMUP = ["--model.init_args.off_policy_steps", "0"]
VARIANTS = {
    "lmbda 0 (KD on data)": ["--model.init_args.lmbda", "0.0", *NO_WARMUP],
    "lmbda 0.5, student sampler": ["--model.init_args.lmbda", "0.5", *NO_WARMUP],
    "lmbda 1, student sampler": ["--model.init_args.lmbda", "1.0", *NO_WARMUP],
    "lmbda 0.5, teacher sampler": [
        "--model.init_args.sampler",
        "teacher",
        "--model.init_args.lmbda",
        "0.5",
        *NO_WARMUP,
    ],
    "lmbda 0.5, mixed sampler (K=25)": [
        "--model.init_args.sampler",
        "mixed",
        "--model.init_args.lmbda",
        "0.5",
        *NO_WARMUP,
    ],
    "recipe: lmbda 0 for 2/3 of the steps, then 1": ["--model.init_args.lmbda", "1.0"],  # + off_policy_steps
}
WARMUP_SHARE = 2 / 3  # the recipe's off_policy_steps: 200 of 300
THROUGHPUT = "train/device/items_per_sec"


def read_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open(newline="") as file:
        return list(csv.DictReader(file))


def summary(rows: list[dict[str, str]]) -> dict[str, float]:
    """Last validation's sample metrics and ppl, mean throughput, mean generation share of sampled steps."""
    last_val = [r for r in rows if r.get("val/sample_teacher_nll")][-1]
    rates = [float(r[THROUGHPUT]) for r in rows if r.get(THROUGHPUT)]
    shares = [float(r["train/generation_share"]) for r in rows if r.get("train/on_policy") == "1.0"]
    return {
        "nll": float(last_val["val/sample_teacher_nll"]),
        "distinct2": float(last_val["val/sample_distinct2"]),
        "ppl": float(last_val["val/ppl"]),
        "tokens_per_s": statistics.mean(rates) if rates else float("nan"),
        "share": statistics.mean(shares) if shares else 0.0,
        "sampled_steps": float(len(shares)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=None, help="names of VARIANTS to run (default all)")
    parser.add_argument(
        "--keep", default=None, help="a directory to keep the runs in (default a temporary one)"
    )
    args = parser.parse_args()
    common = [
        *RECIPE,
        "--trainer.max_steps",
        str(args.steps),
        "--model.init_args.lr_scheduler.init_args.total_steps",
        str(args.steps),
        "--trainer.val_check_interval",
        str(min(100, args.steps)),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=distilkit.callbacks.TokenThroughput",
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        for index, (name, overrides) in enumerate(VARIANTS.items()):
            if args.only and name not in args.only:
                continue
            run_dir = base / f"run{index}"
            if name.startswith("recipe"):
                overrides = [
                    *overrides,
                    "--model.init_args.off_policy_steps",
                    str(round(args.steps * WARMUP_SHARE)),
                ]
            start = time.perf_counter()
            distilkit(["fit", *common, *overrides, "--trainer.default_root_dir", str(run_dir)])
            wall = time.perf_counter() - start
            s = summary(read_rows(run_dir / "metrics.csv"))
            results.append(
                [
                    name,
                    f"{s['nll']:.3f}",
                    f"{s['distinct2']:.3f}",
                    f"{s['ppl']:.1f}",
                    f"{s['tokens_per_s']:.0f}",
                    f"{s['share']:.2f} ({s['sampled_steps']:.0f} steps)",
                    f"{wall / 60:.1f}",
                ]
            )
            print(results[-1], flush=True)
        reference = base / "teacher"
        distilkit(
            ["validate", *RECIPE, "--model.init_args.student", "recipes/teacher"]
            + ["--trainer.default_root_dir", str(reference)]
        )
        rows = read_rows(next(reference.glob("validate*/metrics.csv")))
        val = [r for r in rows if r.get("val/sample_teacher_nll")][-1]
        results.append(
            [
                "teacher's own samples (reference)",
                f"{float(val['val/sample_teacher_nll']):.3f}",
                f"{float(val['val/sample_distinct2']):.3f}",
                f"{float(val['val/ppl']):.1f}",
                "",
                "",
                "",
            ]
        )
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    headers = [f"run ({args.steps} steps)", "val/sample_teacher_nll", "val/sample_distinct2", "val/ppl"]
    print_table(headers + ["tokens/s", "generation share", "minutes"], results)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
