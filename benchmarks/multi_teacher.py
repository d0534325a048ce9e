"""One student from two domain experts: per-domain validation perplexity of the 2 x 128 student trained
alone, from the prose teacher only, from the code teacher only, and from both (routed by source, mixed, and
mixed by posterior), at equal steps and data, over several seeds.

Every run is ``recipes/multi_teacher.yaml`` (the quickstart's student, loss and optimizer on both built-in
corpora, each holding out what its teacher held out: ``split_per_file``) through ``distilkit fit``, with the
teacher side changed by overrides only:

- ``alone``: no teacher (plain cross-entropy);
- ``prose``: ``teacher: recipes/teacher`` (the shipped prose teacher) on every token;
- ``code``: ``teacher: recipes/code_teacher`` on every token;
- ``routed``: the recipe as it is: each document taught by the teacher its ``source`` names;
- ``mixed``: ``mix: {python-reference: 0.5, python-code: 0.5}``: every token from the mixture;
- ``posterior``: ``mix_by: posterior`` with the prior ``--prior P`` (prose) and ``1 - P`` (code): every token
  from the mixture weighted by each teacher's probability of that token (``--prior 0.5 0.25``: one run per
  prior, named ``posterior`` for 0.5 and ``posterior-pP`` for the others).

Every run logs ``val/python-reference/ppl`` and ``val/python-code/ppl`` (``data.domains: source``) on the
whole validation split at its last step. The goal: the two-teacher student within 3% of each
single-teacher student on that teacher's own domain (ratio <= 1.03), and better than each single-teacher
student on the other domain (ratio < 1).

The runs go ``--jobs`` at a time, each in its own process with ``cores / jobs`` threads.
Run: ``nice -n 10 python benchmarks/multi_teacher.py`` (2 seeds, the recipe's 1200 steps: 12 runs of 14-23
minutes, about 1.5 hours on 2 CPU cores; ``--steps 20 --seeds 0`` for a check).
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from _common import ROOT, print_table

RECIPE = "recipes/multi_teacher.yaml"
DOMAINS = {"prose": "python-reference", "code": "python-code"}
NO_TEACHERS = ["--model.init_args.teachers", "null", "--model.init_args.route_by", "null"]
VARIANTS: dict[str, list[str]] = {
    "alone": [*NO_TEACHERS, "--model.init_args.teacher", "null"],
    "prose": [*NO_TEACHERS, "--model.init_args.teacher", "recipes/teacher"],
    "code": [*NO_TEACHERS, "--model.init_args.teacher", "recipes/code_teacher"],
    "routed": [],
    "mixed": [
        "--model.init_args.route_by",
        "null",
        "--model.init_args.mix",
        json.dumps({"python-reference": 0.5, "python-code": 0.5}),
    ],
}
POSTERIOR = ["--model.init_args.route_by", "null", "--model.init_args.mix_by", "posterior"]


def posterior(prior: float) -> list[str]:
    """The overrides of the ``posterior`` variant: prior ``prior`` on the prose teacher, the rest on code."""
    weights = {"python-reference": prior, "python-code": round(1 - prior, 6)}
    return [*POSTERIOR, "--model.init_args.mix", json.dumps(weights)]


LABELS = {
    "alone": "{size} alone (no teacher)",
    "prose": "{size} from the prose teacher only",
    "code": "{size} from the code teacher only",
    "routed": "**{size} from both, routed by source** (`multi_teacher.yaml`)",
    "mixed": "{size} from both, mixed 0.5 / 0.5",
    "posterior": "{size} from both, mixed by posterior (prior {prior:g} / {rest:g})",
}
#: the recipe as written: its length is ``--steps``'s default, its student what ``--student`` updates
RECIPE_CONFIG = yaml.safe_load((ROOT / RECIPE).read_text())


def fit(
    overrides: list[str], seed: int, steps: int, run_dir: Path, threads: int, student: list[str]
) -> dict[str, float]:
    """One run of the recipe with a variant's ``overrides`` in a process of its own; its last validation row
    (the metrics as floats) and its wall time. A run directory marked done (``--keep`` of an earlier call)
    is read back, not rerun, if it holds the same run (older marks do not record the overrides)."""
    done, what = run_dir / "done.json", {"steps": steps, "student": student, "overrides": overrides}
    if done.is_file():  # read back, if it is the same run
        kept = json.loads(done.read_text())
        if any(kept.get(key, value) != value for key, value in what.items()):
            raise SystemExit(f"{run_dir} holds another run ({kept}, not {what}): give another --keep")
        return _last_validation(run_dir) | {"seconds": kept["seconds"]}
    command = [sys.executable, "-m", "distilkit", "fit", "--config", RECIPE, *overrides, *student]
    command += ["--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed)]
    command += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    command += ["--data.init_args.domains", "source", "--progress_bar.refresh_rate", "1000"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.monotonic()
    log = run_dir.parent / f"{run_dir.name}.log"  # not with_suffix: a name may hold a dot (p0.25)
    with log.open("w") as out:
        finished = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({finished.returncode}):\n{log.read_text()[-3000:]}")
    seconds = {"seconds": time.monotonic() - start}
    done.write_text(json.dumps(seconds | what))
    return _last_validation(run_dir) | seconds


def _last_validation(run_dir: Path) -> dict[str, float]:
    rows = [row for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get("val/loss")]
    return {key: float(value) for key, value in rows[-1].items() if value}


def ppl(results: dict, variant: str, domain: str, seeds: list[int], metric: str = "ppl") -> list[float]:
    return [results[variant, seed][f"val/{DOMAINS[domain]}/{metric}"] for seed in seeds]


def runs(variants: list[str], priors: list[float]) -> dict[str, tuple[list[str], str]]:
    """The runs of ``variants`` by name (``posterior`` once per prior: ``posterior`` for 0.5,
    ``posterior-pP`` for the others): each one's overrides and its label (``{size}`` left to fill)."""
    named: dict[str, tuple[list[str], str]] = {}
    for variant in variants:
        if variant != "posterior":
            named[variant] = VARIANTS[variant], LABELS[variant]
            continue
        for prior in priors:
            name = "posterior" if f"{prior:g}" == "0.5" else f"posterior-p{prior:g}"
            label = LABELS[variant].format(size="{size}", prior=prior, rest=round(1 - prior, 6))
            named[name] = posterior(prior), label
    return named


def quality_table(results: dict, labels: dict[str, str], seeds: list[int], size: str) -> None:
    """Per run (by name, with its label): val ppl on each domain, per seed and mean."""
    headers = ["student", *(f"val ppl on {d} (seeds {' / '.join(map(str, seeds))})" for d in DOMAINS)]
    headers += [f"mean on {d}" for d in DOMAINS]
    rows = []
    variants = list(labels)
    for variant in variants:
        cells = [labels[variant].format(size=size)]
        cells += [" / ".join(f"{v:.1f}" for v in ppl(results, variant, d, seeds)) for d in DOMAINS]
        cells += [f"{statistics.mean(ppl(results, variant, d, seeds)):.1f}" for d in DOMAINS]
        rows.append(cells)
    if "routed" in variants:
        teacher = [f"{statistics.mean(ppl(results, 'routed', d, seeds, 'teacher_ppl')):.1f}" for d in DOMAINS]
        rows.append(["(each domain's own teacher)", "", "", *teacher])
    print_table(headers, rows)


def goal_table(results: dict, variants: list[str], seeds: list[int]) -> None:
    """Each two-teacher student against each single-teacher student, domain by domain: the ratio of mean
    val ppl (per seed in brackets) and whether it meets the goal."""
    rows = []
    for both in variants:
        if both in ("alone", "prose", "code"):
            continue
        for single in ("prose", "code"):
            if single not in variants:
                continue
            for domain in DOMAINS:
                own = domain == single
                mine, theirs = ppl(results, both, domain, seeds), ppl(results, single, domain, seeds)
                ratio = statistics.mean(mine) / statistics.mean(theirs)
                per_seed = " / ".join(f"{a / b:.3f}" for a, b in zip(mine, theirs, strict=True))
                goal = "<= 1.03 (its own domain)" if own else "< 1 (the other domain)"
                met = ratio <= 1.03 if own else ratio < 1.0
                rows.append(
                    [
                        both,
                        f"{single} only",
                        domain,
                        f"{ratio:.3f} ({per_seed})",
                        goal,
                        "yes" if met else "no",
                    ]
                )
    print_table(["two teachers", "vs", "on", "ppl ratio (per seed)", "goal", "met"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    recipe_steps = RECIPE_CONFIG["trainer"]["max_steps"]
    parser.add_argument(
        "--steps",
        type=int,
        default=recipe_steps,
        help=f"optimizer steps of every run (the recipe's: {recipe_steps})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each with cores/jobs threads")
    names = [*VARIANTS, "posterior"]
    parser.add_argument("--variants", nargs="+", choices=names, default=names)
    parser.add_argument(
        "--prior",
        type=float,
        nargs="+",
        default=[0.5],
        help="posterior: the prose teacher's prior weight (code: 1 - P); several: one run per prior",
    )
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary one)")
    parser.add_argument(
        "--student",
        type=json.loads,
        help="another student for every run: JSON keys over the recipe's gpt2 config, e.g. "
        "'{\"n_embd\": 256}'",
    )
    args = parser.parse_args()
    named = runs(args.variants, args.prior)
    posteriors = [name for name in named if name.startswith("posterior")]
    if not all(0 <= prior <= 1 for prior in args.prior) or 0 < len(posteriors) < len(args.prior):
        parser.error(f"--prior {args.prior}: give distinct weights in [0, 1] (runs are named by P:g)")
    student = RECIPE_CONFIG["model"]["init_args"]["student"] | (args.student or {})
    size = f"{student['n_layer']}x{student['n_embd']}"
    override = ["--model.init_args.student", json.dumps(student)] if args.student else []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"load average at the start: {os.getloadavg()}; {args.jobs} jobs of {threads} threads")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        futures = {
            (name, seed): pool.submit(
                fit, overrides, seed, args.steps, base / f"{name}-{seed}", threads, override
            )
            for name, (overrides, _) in reversed(named.items())  # the costliest first: they end closer
            for seed in args.seeds
        }
        results = {key: future.result() for key, future in futures.items()}
    print(f"load average at the end: {os.getloadavg()}")
    print(f"\n{args.steps} steps of 16 x 128 tokens, validation on the whole held-out split:\n")
    quality_table(results, {name: label for name, (_, label) in named.items()}, args.seeds, size)
    print()
    goal_table(results, list(named), args.seeds)
    print("\nwall seconds per run (mean over seeds): ", end="")
    seconds = {v: statistics.mean(results[v, s]["seconds"] for s in args.seeds) for v in named}
    print(", ".join(f"{v} {t:.0f}" for v, t in seconds.items()))


if __name__ == "__main__":
    main()
