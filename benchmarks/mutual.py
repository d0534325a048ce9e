"""Mutual and online distillation at equal steps and data, over several seeds, against the same model
trained alone and against distilling from the pretrained teacher.

Every run is a shipped recipe as it is (the quickstart's data and optimizer), run through ``distilkit fit``
once per seed (``--seed_everything``: the models' initialisation, dropout and data order):
``baseline.yaml`` (the 2 x 128 student alone, 300 steps, and the same at 900 steps), ``mutual.yaml`` (two
2 x 128 peers, 900 steps) and the same at ``kd_ratio: 0`` (its control: each peer trained alone, with the
cohort's initialisation, data and dropout draws, so that what a peer gives the other is measured seed by
seed), ``online_teacher.yaml`` (a 4 x 256 and a 2 x 128 peer trained from scratch together, 300 steps) and
``quickstart.yaml`` (the same student distilled from the shipped, pretrained 4 x 256 teacher, 300 steps).
Each reports its final validation perplexity (the last step, the whole validation split) per seed, their
mean, and how many seeds end below the model trained alone for as many steps at the same seed, or below its
control; and its compute, measured in the seed-0 run: the FLOPs of one training step (forward and backward
matmuls and attention, counted by a dispatch mode) and the median wall time of its steps. The shipped
teacher's own pretraining is measured the same way on two steps of ``teacher_pretrain.yaml`` (its
checkpoint is the one at step 400).

The runs go ``--jobs`` at a time, each in its own process with ``cores / jobs`` threads, so step times
compare only between runs made with the same ``--jobs``.

Run: ``python benchmarks/mutual.py`` (3 seeds, 2 jobs: about 45 minutes on 2 CPU cores;
``--steps 30 --seeds 0`` for a check; ``--runs alone-900 mutual mutual-kd0`` for a part;
``--steps 300 --runs mutual mutual-kd0 --mutual-args="--model.init_args.kd_ratio 0.2"`` for a variant).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from _common import print_table

ROOT = Path(__file__).resolve().parents[1]
TEACHER_PRETRAIN_STEPS = 400  # recipes/teacher: the best checkpoint of teacher_pretrain.yaml, at step 400


@dataclass(frozen=True)
class Run:
    """One recipe run at every seed: the models it reports (label -> the metric of its final val ppl; a
    label starting with "2x128" is the student's size), the run of the same model alone at the same number
    of steps (``alone``), and the run that is its control (the same peers, initialisation, data and
    dropout draws, with nothing to learn from each other)."""

    recipe: str
    models: dict[str, str]
    extra: tuple[str, ...] = ()
    alone: str | None = None
    control: str | None = None
    steps: int | None = None  # None: the recipe's own max_steps
    val_check_interval: int | None = None  # with ``steps``: how often it validates

    def recipe_config(self) -> dict:
        return yaml.safe_load((ROOT / "recipes" / self.recipe).read_text())


RUNS: dict[str, Run] = {
    "alone": Run("baseline.yaml", {"2x128 alone (baseline.yaml)": "val/ppl"}),
    "quickstart": Run(
        "quickstart.yaml",
        {
            "2x128 from the pretrained 4x256 teacher (quickstart.yaml)": "val/ppl",
            "the pretrained 4x256 teacher itself": "val/teacher_ppl",
        },
        alone="alone",
    ),
    "online": Run(
        "online_teacher.yaml",
        {
            "2x128 with an online 4x256 teacher (online_teacher.yaml)": "val/peer1/ppl",
            "its 4x256 online teacher": "val/peer0/ppl",
        },
        alone="alone",
    ),
    "alone-900": Run(
        "baseline.yaml",
        {"2x128 alone (baseline.yaml)": "val/ppl"},
        alone="alone-900",
        steps=900,  # mutual.yaml's length and validation interval
        val_check_interval=150,
    ),
    "mutual": Run(
        "mutual.yaml",
        {
            "2x128 mutual.yaml, peer 0": "val/peer0/ppl",
            "2x128 mutual.yaml, peer 1": "val/peer1/ppl",
        },
        alone="alone-900",
        control="mutual-kd0",
    ),
    "mutual-kd0": Run(
        "mutual.yaml",
        {
            "2x128 mutual.yaml at kd_ratio 0 (each peer alone), peer 0": "val/peer0/ppl",
            "2x128 mutual.yaml at kd_ratio 0, peer 1": "val/peer1/ppl",
        },
        extra=("--model.init_args.kd_ratio", "0"),
        alone="alone-900",
    ),
}


def run_steps(run: Run, steps: int | None) -> int:
    """How many steps ``run`` trains for: ``steps`` when given, else its own length."""
    return steps or run.steps or int(run.recipe_config()["trainer"]["max_steps"])


def run_arguments(run: Run, steps: int | None) -> list[str]:
    """``run``'s own arguments, at ``steps`` when given (then every run has that length and validates once
    at its end), with its LR schedules (OneCycleLR over all of a run's steps) as long as the run."""
    config = run.recipe_config()
    length = run_steps(run, steps)
    if length == config["trainer"]["max_steps"]:
        return list(run.extra)
    interval = length if steps else (run.val_check_interval or length)
    extra = [*run.extra, "--trainer.max_steps", str(length), "--trainer.val_check_interval", str(interval)]
    init_args = config["model"]["init_args"]
    if "lr_scheduler" in init_args:
        return [*extra, "--model.init_args.lr_scheduler.init_args.total_steps", str(length)]
    schedules = [
        s | {"init_args": s["init_args"] | {"total_steps": length}} for s in init_args["lr_schedulers"]
    ]
    return [*extra, "--model.init_args.lr_schedulers", json.dumps(schedules)]


def fit(recipe: str, run_dir: Path, threads: int, *extra: str) -> dict:
    """Run ``recipe`` into ``run_dir`` in a process of its own with the compute meter; its last validation
    row and compute."""
    meter = [{"class_path": "_common.StepCompute", "init_args": {"output": str(run_dir / "compute.json")}}]
    command = [sys.executable, "-m", "distilkit", "fit", "--config", f"recipes/{recipe}"]
    command += ["--trainer.default_root_dir", str(run_dir), *extra]
    command += ["--trainer.callbacks", json.dumps(meter), "--progress_bar.refresh_rate", "1000"]
    path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    metrics = run_dir / "metrics.csv"  # absent when nothing was logged (a short run without validation)
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/loss")] if metrics.is_file() else []
    return {"val": rows[-1] if rows else {}, **json.loads((run_dir / "compute.json").read_text())}


def quality_rows(
    results: dict[tuple[str, int], dict], names: list[str], seeds: list[int], steps: dict[str, int]
) -> list[list[str]]:
    """Per model: its final val ppl at each seed and their mean; for a 2 x 128 model, its mean against the
    mean of the model alone at the same length, and at how many seeds it ends below the model alone at that
    seed; for a run with a control, the mean over seeds of its ratio to the same peer of the control."""

    def ppl(name: str, metric: str) -> dict[int, float]:
        return {seed: float(results[name, seed]["val"][metric]) for seed in seeds}

    rows = []
    for name in names:
        run = RUNS[name]
        alone = ppl(run.alone, "val/ppl") if run.alone in names else None
        for position, (label, metric) in enumerate(run.models.items()):
            own = ppl(name, metric)
            mean = statistics.mean(own.values())
            cells = [
                f"{label}, {steps[name]} steps",
                " / ".join(f"{own[s]:.1f}" for s in seeds),
                f"{mean:.1f}",
            ]
            cells += ["", "", ""]
            if label.startswith("2x128") and alone is not None and run.alone != name:
                cells[3] = f"{mean / statistics.mean(alone.values()):.3f}"
                cells[4] = f"{sum(own[s] < alone[s] for s in seeds)} / {len(seeds)}"
            if run.control in names:
                control = ppl(run.control, list(RUNS[run.control].models.values())[position])
                paired = [own[s] / control[s] for s in seeds]
                cells[5] = (
                    f"{statistics.mean(paired):.3f} ({sum(r < 1 for r in paired)} / {len(seeds)} below)"
                )
            rows.append(cells)
    return rows


def _median_step(result: dict) -> float:
    """The median wall time of a run's steps after the first two (all of them in a shorter run)."""
    times = result["step_seconds"]
    return statistics.median(times[2:] or times)


def compute_rows(
    results: dict[tuple[str, int], dict],
    names: list[str],
    seed: int,
    steps: dict[str, int],
    pretrain: dict | None,
) -> list[list[str]]:
    """Per run (at ``seed``): FLOPs and median wall time of a step, each against the model alone, and the
    FLOPs of the whole run."""
    base = results["alone", seed] if "alone" in names else None
    rows = []
    for name in names:
        flops, seconds = results[name, seed]["flops_per_step"], _median_step(results[name, seed])
        note = ""
        if name == "quickstart" and pretrain is not None:
            teacher = pretrain["flops_per_step"] * TEACHER_PRETRAIN_STEPS
            note = f" + {teacher / 1e12:.1f} (teacher pretraining, {TEACHER_PRETRAIN_STEPS} steps)"
        ratios = ["", ""]
        if base is not None:
            ratios = [f"{flops / base['flops_per_step']:.2f}", f"{seconds / _median_step(base):.2f}"]
        total = f"{flops * steps[name] / 1e12:.1f}{note}"
        rows.append(
            [name, str(steps[name]), f"{flops / 1e9:.1f}", ratios[0], f"{seconds:.2f}", ratios[1], total]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="train every run for this many steps (default: its own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each with cores/jobs threads")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="runs to make")
    parser.add_argument(
        "--mutual-args",
        default="",
        help="more arguments for the mutual runs and their control, to measure a variant of mutual.yaml "
        '(e.g. --mutual-args="--model.init_args.burn_in_steps 200")',
    )
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    steps = {name: run_steps(RUNS[name], args.steps) for name in args.runs}
    print(f"load average at the start: {os.getloadavg()}; {args.jobs} jobs of {threads} threads")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            (name, seed): pool.submit(
                fit,
                RUNS[name].recipe,
                Path(tmp) / f"{name}-{seed}",
                threads,
                *(args.mutual_args.split() if RUNS[name].recipe == "mutual.yaml" else []),
                *run_arguments(RUNS[name], args.steps),
                "--seed_everything",
                str(seed),
            )
            for name in reversed(args.runs)  # the costliest first: the runs finish closer together
            for seed in args.seeds
        }
        pretrain = None
        if "quickstart" in args.runs:  # the shipped teacher's pretraining, for the compute table
            pretrain_run = Run("teacher_pretrain.yaml", {}, steps=2)
            arguments = [*run_arguments(pretrain_run, None), "--trainer.limit_val_batches", "0"]
            pretrain = pool.submit(
                fit, "teacher_pretrain.yaml", Path(tmp) / "teacher-pretrain", threads, *arguments
            )
        results = {}
        for key, future in futures.items():
            results[key] = future.result()
            ppl = {k: round(float(v), 1) for k, v in results[key]["val"].items() if k.endswith("ppl") and v}
            print(f"{key}: {ppl} load {os.getloadavg()}", flush=True)
        pretrain_result = None if pretrain is None else pretrain.result()
    print(f"load average at the end: {os.getloadavg()}\n")

    seeds = " / ".join(str(s) for s in args.seeds)
    headers = [
        "model (same data)",
        f"final val ppl, seeds {seeds}",
        "mean",
        "mean vs 2x128 alone (same steps)",
    ]
    headers += ["seeds below alone", "vs the same peer at kd_ratio 0"]
    print_table(headers, quality_rows(results, args.runs, args.seeds, steps))
    print()
    headers = ["run", "steps", "GFLOPs / step", "vs alone", "median s / step", "vs alone", "TFLOPs (run)"]
    print_table(headers, compute_rows(results, args.runs, args.seeds[0], steps, pretrain_result))


if __name__ == "__main__":
    main()
