"""A student cut from the teacher against a random-init one: validation perplexity against steps.

All variants are the quickstart (``recipes/quickstart.yaml``: the shipped 4 x 256 teacher, a 2 x 128
student with n_inner 512, forward KL mixed half and half with CE, AdamW with a one-cycle schedule, the same
300 steps on the same data); only the student's starting weights differ:

* random init (the quickstart itself);
* (a) every other teacher block (``layers: [0, 2]``) and magnitude width pruning;
* (b) blocks ranked by block influence (``layer_ranking: influence``) and activation width pruning;
* (c) blocks ranked by the teacher's loss without them (``layer_ranking: loss``) and activation width
  pruning.

Calibration: the first 8 training batches (``recipes/pruned.yaml``).

Each run validates every ``--every`` steps on the whole validation split (the same for all); step 0 is a
``distilkit validate`` of the starting model. The table gives the perplexity at a few steps, the first
validated step at which each variant reaches the random-init student's final perplexity, and the final
perplexity against random init's. Run: ``python benchmarks/pruned_start.py`` (about 15 minutes on 2 idle
CPU cores); ``--results FILE`` keeps each variant's curve and reuses it (runs are seeded, so a variant
measured in another process gives the same curve).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from _common import ROOT, print_table

from distilkit.cli import main as distilkit

CUT = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_inner": 512}


def cut_student(**options: object) -> list[str]:
    """``recipes/pruned.yaml`` with its student cut as ``options`` say."""
    spec = json.dumps({"from_teacher": {**CUT, **options}})
    return ["--config", "recipes/pruned.yaml", "--model.init_args.student", spec]


VARIANTS: dict[str, list[str]] = {
    "random init (quickstart)": ["--config", "recipes/quickstart.yaml"],
    "(a) layers [0, 2] + magnitude": cut_student(layers=[0, 2], importance="magnitude"),
    "(b) ranked by influence + activation": cut_student(layer_ranking="influence", importance="activation"),
    "(c) ranked by loss + activation": cut_student(layer_ranking="loss", importance="activation"),
}


def val_curve(run_dir: Path) -> dict[int, float]:
    """``{steps trained: val/ppl}`` from a run's ``metrics.csv`` (its step column counts from 0)."""
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("val/ppl")]
    return {int(r["step"]) + 1: float(r["val/ppl"]) for r in rows}


def start_ppl(run_dir: Path) -> float:
    """The starting model's val/ppl, from ``distilkit validate`` of the same recipe."""
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("val/ppl")]
    return float(rows[-1]["val/ppl"])


def measure(name: str, every: int, tmp: str) -> dict[int, float]:
    """``{steps: val/ppl}`` of one variant: a fit validated every ``every`` steps, and step 0."""
    run_dir = Path(tmp) / name.split()[0].strip("()")
    common = ["--trainer.val_check_interval", str(every), "--trainer.enable_progress_bar", "false"]
    distilkit(["fit", *VARIANTS[name], *common, "--trainer.default_root_dir", str(run_dir)])
    curve = val_curve(run_dir)
    distilkit(["validate", *VARIANTS[name], "--trainer.default_root_dir", str(run_dir)])
    return {0: start_ppl(run_dir / "validate"), **curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10, help="validate every N steps")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    parser.add_argument(
        "--results", type=Path, help="a JSON file of curves: variants found there are not run again"
    )
    args = parser.parse_args()
    saved = json.loads(args.results.read_text()) if args.results and args.results.is_file() else {}
    curves: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            key = f"{name} / every {args.every}"
            if key in saved:
                curves[name] = {int(s): p for s, p in saved[key].items()}
                continue
            curves[name] = measure(name, args.every, tmp)
            points = ", ".join(f"{s}: {p:.1f}" for s, p in sorted(curves[name].items()))
            print(f"{name}: {points}", flush=True)
            if args.results:
                saved = json.loads(args.results.read_text()) if args.results.is_file() else {}
                saved[key] = curves[name]
                args.results.write_text(json.dumps(saved, indent=1))
    reference = curves[args.variants[0]]
    last = max(reference)
    target = reference[last]
    shown = sorted({0, args.every, 3 * args.every, 6 * args.every, last // 5, last // 2, last})
    rows = []
    for name, curve in curves.items():
        reached = next((s for s in sorted(curve) if curve[s] <= target), None)
        final = curve[max(curve)]
        rows.append(
            [name, *(f"{curve[s]:.1f}" if s in curve else "-" for s in shown)]
            + [
                "-" if reached is None else f"{reached} ({reached / last:.0%})",
                f"{final / target - 1:+.1%}",
            ]
        )
    headers = ["student start", *(f"ppl @{s}" for s in shown)]
    print_table([*headers, f"steps to reach {target:.1f}", "final vs random"], rows)


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    main()
