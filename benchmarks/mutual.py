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

``--corpus SOURCE`` trains and validates every run on another corpus (``TextDataModule``'s
``train_files``, e.g. ``builtin:python-code``; the recipes' own is the prose of ``builtin:python-reference``),
with the same tokenizer and split. ``--variant LABEL=ARGS`` (repeatable) adds a variant of ``mutual.yaml``
(ARGS: its command-line settings) measured beside it, against the same ``kd_ratio: 0`` control;
``--mutual-args`` goes to every ``mutual.yaml`` run, the control included (e.g. other peers). Besides the
final perplexity, the table gives the step of each run's lowest validation perplexity (before the last
step: the model overfits), and for a cohort its ``val/peer_agreement`` and, with ``kd_positions:
peer_better``, each peer's ``val/peer{i}/kd_share`` (the share of positions where the others give the next
token more probability), at the last validation. ``--out DIR`` keeps every run in DIR and reuses a run kept
there with the same recipe text and arguments (so variants measured later share the control and the model
alone; start a new DIR when the code changes).

Run: ``python benchmarks/mutual.py`` (3 seeds, 2 jobs: about 45 minutes on 2 CPU cores;
``--steps 30 --seeds 0`` for a check; ``--runs alone-900 mutual mutual-kd0`` for a part;
``--steps 300 --runs mutual mutual-kd0 --mutual-args="--model.init_args.kd_ratio 0.2"`` for a variant;
``--runs alone-900 mutual-kd0 mutual --corpus builtin:python-code --seeds 0 1
--variant "peer_better=--model.init_args.kd_positions peer_better"`` for the code corpus).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from _common import ROOT, print_table

TEACHER_PRETRAIN_STEPS = 400  # recipes/teacher: the best checkpoint of teacher_pretrain.yaml, at step 400


@dataclass(frozen=True)
class Run:
    """One recipe run at every seed: the models it reports (label -> the metric of its final val ppl), which
    of them are of another size than the student (``others``: not compared with the student alone), the run
    of the same model alone at the same number of steps (``alone``), and the run that is its control (the
    same peers, initialisation, data and dropout draws, with nothing to learn from each other)."""

    recipe: str
    models: dict[str, str]
    extra: tuple[str, ...] = ()
    alone: str | None = None
    control: str | None = None
    steps: int | None = None  # None: the recipe's own max_steps
    val_check_interval: int | None = None  # with ``steps``: how often it validates
    others: frozenset[str] = field(default_factory=frozenset)

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
        others=frozenset({"the pretrained 4x256 teacher itself"}),
    ),
    "online": Run(
        "online_teacher.yaml",
        {
            "2x128 with an online 4x256 teacher (online_teacher.yaml)": "val/peer1/ppl",
            "its 4x256 online teacher": "val/peer0/ppl",
        },
        alone="alone",
        others=frozenset({"its 4x256 online teacher"}),
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
        {"mutual.yaml, peer 0": "val/peer0/ppl", "mutual.yaml, peer 1": "val/peer1/ppl"},
        alone="alone-900",
        control="mutual-kd0",
    ),
    "mutual-kd0": Run(
        "mutual.yaml",
        {
            "mutual.yaml at kd_ratio 0 (each peer alone), peer 0": "val/peer0/ppl",
            "mutual.yaml at kd_ratio 0, peer 1": "val/peer1/ppl",
        },
        extra=("--model.init_args.kd_ratio", "0"),
        alone="alone-900",
    ),
}


def variant(spec: str) -> tuple[str, Run]:
    """``LABEL=ARGS`` -> (its run name, ``mutual.yaml`` with ARGS, against the ``mutual`` run's control)."""
    label, sep, args = spec.partition("=")
    if not sep or not label or not shlex.split(args):
        raise SystemExit(
            f"--variant {spec!r}: give LABEL=ARGS, e.g. 'pb=--model.init_args.kd_positions peer_better'"
        )
    models = {f"mutual.yaml + {label}, peer {i}": f"val/peer{i}/ppl" for i in (0, 1)}
    return f"mutual+{label}", replace(RUNS["mutual"], models=models, extra=tuple(shlex.split(args)))


def run_steps(run: Run, steps: int | None) -> int:
    """How many steps ``run`` trains for: ``steps`` when given, else its own length."""
    return steps or run.steps or int(run.recipe_config()["trainer"]["max_steps"])


def run_arguments(run: Run, steps: int | None) -> list[str]:
    """``run``'s own arguments, at ``steps`` when given (then every run has that length and validates once
    at its end); its LR schedules follow the run's length."""
    length = run_steps(run, steps)
    if length == run.recipe_config()["trainer"]["max_steps"]:
        return list(run.extra)
    interval = length if steps else (run.val_check_interval or length)
    return [*run.extra, "--trainer.max_steps", str(length), "--trainer.val_check_interval", str(interval)]


def fit(recipe: str, runs_dir: Path, name: str, threads: int, *extra: str) -> dict:
    """Run ``recipe`` with ``extra`` arguments in a process of its own with the compute meter, into a
    directory of ``runs_dir`` named by ``name`` and a hash of the recipe's text and the arguments, unless a
    finished run is kept there; its validation rows (``step``: the steps trained) and compute."""
    key = hashlib.sha256(json.dumps([(ROOT / "recipes" / recipe).read_text(), extra]).encode()).hexdigest()
    run_dir = runs_dir / f"{name}-{key[:12]}"
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
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
    vals = [
        {k: v for k, v in row.items() if v} | {"step": int(row["step"]) + 1} for row in rows
    ]  # logged at step - 1
    result = {"command": command, "vals": vals, **json.loads((run_dir / "compute.json").read_text())}
    result_file.write_text(json.dumps(result))
    return result


def final(result: dict, metric: str) -> float:
    """``metric`` at a run's last validation."""
    return float(result["vals"][-1][metric])


def lowest_step(result: dict, metric: str) -> int:
    """The step of a run's validation with the lowest ``metric``."""
    return min(result["vals"], key=lambda row: float(row[metric]))["step"]


def quality_rows(
    results: dict[tuple[str, int], dict], names: list[str], seeds: list[int], steps: dict[str, int]
) -> list[list[str]]:
    """Per model: its final val ppl at each seed and their mean; for a model of the student's size, its mean
    against the mean of the model alone at the same length, and at how many seeds it ends below the model
    alone at that seed; for a run with a control, the mean over seeds of its ratio to the same peer of the
    control; the step of its lowest val ppl at each seed; for a cohort, the means over seeds of the peers'
    agreement and of each peer's kd_share at the last validation."""

    def ppl(name: str, metric: str) -> dict[int, float]:
        return {seed: final(results[name, seed], metric) for seed in seeds}

    def mean_of(name: str, metric: str) -> str:
        values = [row[metric] for s in seeds if metric in (row := results[name, s]["vals"][-1])]
        return f"{statistics.mean(map(float, values)):.3f}" if values else ""

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
            cells += ["", "", "", " / ".join(str(lowest_step(results[name, s], metric)) for s in seeds)]
            cells += ["", ""]
            if label not in run.others and alone is not None and run.alone != name:
                cells[3] = f"{mean / statistics.mean(alone.values()):.3f}"
                cells[4] = f"{sum(own[s] < alone[s] for s in seeds)} / {len(seeds)}"
            if run.control in names:
                control = ppl(run.control, list(RUNS[run.control].models.values())[position])
                paired = [own[s] / control[s] for s in seeds]
                cells[5] = (
                    f"{statistics.mean(paired):.3f} ({sum(r < 1 for r in paired)} / {len(seeds)} below)"
                )
            if metric.startswith("val/peer"):
                cells[7] = mean_of(name, "val/peer_agreement")
                cells[8] = mean_of(name, metric.removesuffix("ppl") + "kd_share")
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
        "--corpus", help="train_files of every run (default: each recipe's own, builtin:python-reference)"
    )
    parser.add_argument(
        "--mutual-args",
        default="",
        help="more arguments for the mutual runs and their control, to measure a variant of mutual.yaml "
        '(e.g. --mutual-args="--model.init_args.burn_in_steps 200")',
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="a variant of mutual.yaml measured beside it against the same control (repeatable)",
    )
    parser.add_argument(
        "--out", type=Path, help="keep the runs here, reusing those kept with the same arguments"
    )
    args = parser.parse_args()
    names = list(args.runs)
    for spec in args.variant:
        name, run = variant(spec)
        RUNS[name] = run
        names.append(name)
    corpus = ["--data.init_args.train_files", args.corpus] if args.corpus else []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    steps = {name: run_steps(RUNS[name], args.steps) for name in names}
    print(f"load average at the start: {os.getloadavg()}; {args.jobs} jobs of {threads} threads")
    print(f"corpus: {args.corpus or 'the recipes own'}; mutual.yaml runs with: {args.mutual_args or '-'}")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        runs_dir = args.out or Path(tmp)
        runs_dir.mkdir(parents=True, exist_ok=True)
        futures = {
            (name, seed): pool.submit(
                fit,
                RUNS[name].recipe,
                runs_dir,
                f"{name}-{seed}",
                threads,
                *corpus,
                *(shlex.split(args.mutual_args) if RUNS[name].recipe == "mutual.yaml" else []),
                *run_arguments(RUNS[name], args.steps),
                "--seed_everything",
                str(seed),
            )
            for name in reversed(names)  # the costliest first: the runs finish closer together
            for seed in args.seeds
        }
        pretrain = None
        if "quickstart" in names:  # the shipped teacher's pretraining, for the compute table
            pretrain_run = Run("teacher_pretrain.yaml", {}, steps=2)
            arguments = [*run_arguments(pretrain_run, None), "--trainer.limit_val_batches", "0"]
            pretrain = pool.submit(
                fit, "teacher_pretrain.yaml", runs_dir, "teacher-pretrain", threads, *arguments
            )
        results = {}
        for key, future in futures.items():
            results[key] = future.result()
            last = results[key]["vals"][-1] if results[key]["vals"] else {}
            ppl = {k: round(float(v), 1) for k, v in last.items() if k.endswith("ppl")}
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
    headers += ["seeds below alone", "vs the same peer at kd_ratio 0", "step of the lowest val ppl"]
    headers += ["val/peer_agreement", "val kd_share"]
    print_table(headers, quality_rows(results, names, args.seeds, steps))
    print()
    headers = ["run", "steps", "GFLOPs / step", "vs alone", "median s / step", "vs alone", "TFLOPs (run)"]
    print_table(headers, compute_rows(results, names, args.seeds[0], steps, pretrain_result))


if __name__ == "__main__":
    main()
