"""Learning-rate schedules at equal steps: constant, cosine (one-cycle) and the curriculum recipe.

Each runs the quickstart distillation for the same 300 steps and reports the final validation
perplexity of the student. Run: ``python benchmarks/schedules.py`` (about 8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from _common import ROOT, print_table

from distilkit.cli import main as distilkit

COMMON = ["--trainer.val_check_interval", "25", "--trainer.limit_val_batches", "10"]
VARIANTS = {
    "constant lr 2e-3": ["--config", "recipes/quickstart.yaml", "--model.init_args.lr_scheduler", "null"],
    "cosine one-cycle 2e-3 (quickstart)": ["--config", "recipes/quickstart.yaml"],
    "curriculum (recipes/curriculum.yaml)": ["--config", "recipes/curriculum.yaml"],
}


def final_val_ppl(metrics_csv: Path) -> tuple[int, float]:
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/ppl")]
    return int(rows[-1]["step"]), float(rows[-1]["val/ppl"])


def main() -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in VARIANTS.items():
            run_dir = Path(tmp) / name.split()[0]
            distilkit(["fit", *args, *COMMON, "--trainer.default_root_dir", str(run_dir)])
            step, ppl = final_val_ppl(run_dir / "metrics.csv")
            results.append([name, step + 1, f"{ppl:.1f}"])
    print_table(["schedule", "steps", "final val ppl"], results)


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    main()
