"""The learning curve of a run, drawn from its ``metrics.csv``: losses and learning rate against step,
with curriculum stage boundaries and rollbacks marked. ``distilkit plot RUN_DIR`` redraws it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from distilkit.errors import ConfigError
from distilkit.loggers import csv_logger, wandb_loggers

PNG_NAME = "learning_curve.png"


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{column: [(step, value), ...]}``, empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            step = int(float(row["step"]))
            for key, text in row.items():
                if key not in ("step", "epoch") and text not in ("", None):
                    series.setdefault(key, []).append((step, float(text)))
    return series


def plot_learning_curve(metrics_csv: Path, out: Path, stage_names: list[str] | None = None) -> Path:
    """Draw train/val loss and val CE (left axis) and learning rate (right axis) against step.

    Stage changes (``curriculum/stage``) are vertical lines labelled with the stage's name; rollbacks (a
    rise of ``curriculum/retries``) are red crosses on the loss curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    figure, loss_axis = plt.subplots(figsize=(9, 5))
    for key, style in (("train/loss", "-"), ("val/loss", "o-"), ("val/ce_loss", "s:")):
        if key in series:
            steps, values = zip(*series[key], strict=True)
            loss_axis.plot(steps, values, style, label=key, markersize=4)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    lr_key = "curriculum/lr" if "curriculum/lr" in series else "train/lr"
    if lr_key in series:
        lr_axis = loss_axis.twinx()
        steps, values = zip(*series[lr_key], strict=True)
        lr_axis.plot(steps, values, color="tab:gray", alpha=0.6, label="learning rate")
        lr_axis.set_ylabel("learning rate")
    _mark_stages(loss_axis, series, stage_names or [])
    loss_axis.legend(loc="upper right")
    loss_axis.set_title(f"learning curve: {metrics_csv.parent.name}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _mark_stages(axis: Any, series: dict[str, list[tuple[int, float]]], names: list[str]) -> None:
    stages = series.get("curriculum/stage", [])
    previous = None
    for step, value in stages:
        index = int(value)
        if index != previous:
            axis.axvline(step, color="tab:purple", linestyle="--", alpha=0.5)
            label = names[index] if index < len(names) else f"stage {index}"
            axis.annotate(
                label,
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                fontsize=8,
                color="tab:purple",
            )
            previous = index
    retries = series.get("curriculum/retries", [])
    losses = dict(series.get("train/loss", []))
    for (_, before), (step, after) in zip(retries, retries[1:], strict=False):
        if after > before:
            axis.plot(
                step,
                losses.get(step, axis.get_ylim()[1]),
                "rx",
                markersize=10,
                label="rollback" if before == 0 else None,
            )


def draw_run_curve(trainer: Any, stage_names: list[str] | None = None) -> Path | None:
    """After a fit: flush the CSV logger, draw the PNG beside ``metrics.csv``, log it to W&B if present."""
    if not trainer.is_global_zero:
        return None
    csv = csv_logger(trainer)
    if csv is None:
        return None
    csv.save()
    metrics_csv = Path(csv.log_dir) / "metrics.csv"
    if not metrics_csv.is_file():
        return None
    png = plot_learning_curve(metrics_csv, metrics_csv.with_name(PNG_NAME), stage_names)
    for logger in wandb_loggers(trainer):
        logger.log_image(key="learning_curve", images=[str(png)])
    return png


def _stage_names_from_config(run_dir: Path) -> list[str]:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return []
    config = yaml.safe_load(config_path.read_text()) or {}
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("CurriculumCallback"):
            return [stage.get("name", "") for stage in callback.get("init_args", {}).get("stages", [])]
    return []


def plot_main(args: list[str]) -> None:
    """``distilkit plot RUN_DIR``: redraw ``RUN_DIR/learning_curve.png`` from ``RUN_DIR/metrics.csv``."""
    if len(args) != 1 or args[0].startswith("-"):
        raise ConfigError("RUN_DIR", " ".join(args), "is missing", "usage: distilkit plot RUN_DIR")
    run_dir = Path(args[0])
    metrics_csv = run_dir / "metrics.csv"
    if not metrics_csv.is_file():
        raise ConfigError(
            "RUN_DIR", str(run_dir), "holds no metrics.csv", "give the directory of a distilkit run"
        )
    out = plot_learning_curve(metrics_csv, run_dir / PNG_NAME, _stage_names_from_config(run_dir))
    print(f"wrote {out}")
