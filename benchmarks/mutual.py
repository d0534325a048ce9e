"""Mutual and online distillation at equal steps and data, against the same model trained alone and
against distilling from the pretrained teacher.

Every run is a shipped recipe as it is (the quickstart's data, optimizer and 300 steps), run through
``distilkit fit``: ``baseline.yaml`` (the 2 x 128 student alone), ``quickstart.yaml`` (the same student
distilled from the shipped, pretrained 4 x 256 teacher), ``mutual.yaml`` (two 2 x 128 peers, simultaneous
updates after a 100-step burn-in on the labels alone) and the same with ``update: alternate``, and
``online_teacher.yaml`` (a 4 x 256 and a 2 x 128 peer trained from scratch together). Each reports its
final validation perplexity (step 300, the whole validation split) and its compute, both measured in the
run itself: the FLOPs of one training step (forward and backward matmuls and attention, torch's
``FlopCounterMode``) and the median wall time of its steps. The shipped teacher's own pretraining is
measured the same way on two steps of ``teacher_pretrain.yaml`` (its checkpoint is the one at step 400).
``--steps`` below 100 leaves the mutual runs inside their burn-in (no distillation).

Run: ``python benchmarks/mutual.py`` (about 40 minutes on 2 idle CPU cores; ``--steps 30`` for a check).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
from pathlib import Path

from _common import print_table

from distilkit.cli import main as distilkit

ROOT = Path(__file__).resolve().parents[1]
TEACHER_PRETRAIN_STEPS = 400  # recipes/teacher: the best checkpoint of teacher_pretrain.yaml, at step 400

#: name -> (recipe, extra arguments, {model label: the metric of its final val ppl})
RUNS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "alone": ("baseline.yaml", [], {"2x128 alone (baseline.yaml)": "val/ppl"}),
    "quickstart": (
        "quickstart.yaml",
        [],
        {
            "2x128 from the pretrained 4x256 teacher (quickstart.yaml)": "val/ppl",
            "the pretrained 4x256 teacher itself": "val/teacher_ppl",
        },
    ),
    "mutual": (
        "mutual.yaml",
        [],
        {
            "2x128 mutual, peer 0 (mutual.yaml: simultaneous, burn-in 100)": "val/peer0/ppl",
            "2x128 mutual, peer 1": "val/peer1/ppl",
        },
    ),
    "mutual alternate": (
        "mutual.yaml",
        ["--model.init_args.update", "alternate"],
        {
            "2x128 mutual alternate (burn-in 100), peer 0": "val/peer0/ppl",
            "2x128 mutual alternate (burn-in 100), peer 1": "val/peer1/ppl",
        },
    ),
    "online": (
        "online_teacher.yaml",
        [],
        {
            "2x128 with an online 4x256 teacher (online_teacher.yaml)": "val/peer1/ppl",
            "its 4x256 online teacher": "val/peer0/ppl",
        },
    ),
}


def fit(recipe: str, run_dir: Path, *extra: str) -> dict:
    """Run ``recipe`` into ``run_dir`` with the compute meter; its last validation row and compute."""
    meter = [{"class_path": "_common.StepCompute", "init_args": {"output": str(run_dir / "compute.json")}}]
    distilkit(
        ["fit", "--config", f"recipes/{recipe}", "--trainer.default_root_dir", str(run_dir), *extra]
        + ["--trainer.callbacks", json.dumps(meter), "--progress_bar.refresh_rate", "1000"]
    )
    metrics = run_dir / "metrics.csv"  # absent when nothing was logged (a short run without validation)
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/loss")] if metrics.is_file() else []
    return {"val": rows[-1] if rows else {}, **json.loads((run_dir / "compute.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps of every run (300: the recipes)"
    )
    args = parser.parse_args()
    length = [] if args.steps == 300 else ["--trainer.max_steps", str(args.steps)]
    length += [] if args.steps == 300 else ["--trainer.val_check_interval", str(args.steps)]
    print(f"load average at the start: {os.getloadavg()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, extra, _) in RUNS.items():
            results[name] = fit(recipe, Path(tmp) / name.replace(" ", "-"), *extra, *length)
            print(f"{name}: {results[name]['val']} load {os.getloadavg()}", flush=True)
        short = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
        pretrain = fit("teacher_pretrain.yaml", Path(tmp) / "teacher-pretrain", *short)
    print(f"load average at the end: {os.getloadavg()}\n")

    alone = float(results["alone"]["val"]["val/ppl"])
    rows = []
    for name, (_, _, models) in RUNS.items():
        for label, metric in models.items():
            ppl = float(results[name]["val"][metric])
            same_model = label.startswith("2x128")  # compared with the same model trained alone
            rows.append([label, f"{ppl:.1f}", f"{ppl / alone:.3f}" if same_model else ""])
    print_table([f"model ({args.steps} steps, same data)", "final val ppl", "vs 2x128 alone"], rows)
    print()

    base_flops = results["alone"]["flops_per_step"]
    base_time = statistics.median(results["alone"]["step_seconds"][2:])
    rows = []
    for name in RUNS:
        flops = results[name]["flops_per_step"]
        seconds = statistics.median(results[name]["step_seconds"][2:])
        total = flops * args.steps
        note = ""
        if name == "quickstart":
            teacher = pretrain["flops_per_step"] * TEACHER_PRETRAIN_STEPS
            note = f" + {teacher / 1e12:.1f} (teacher pretraining, {TEACHER_PRETRAIN_STEPS} steps)"
        ratios = [f"{flops / base_flops:.2f}", f"{seconds:.2f}", f"{seconds / base_time:.2f}"]
        rows.append([name, f"{flops / 1e9:.1f}", *ratios, f"{total / 1e12:.1f}{note}"])
    headers = [
        "run",
        "GFLOPs / step",
        "vs alone",
        "median s / step",
        "vs alone",
        f"TFLOPs ({args.steps} steps)",
    ]
    print_table(headers, rows)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
