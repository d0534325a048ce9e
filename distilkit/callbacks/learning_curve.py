"""The learning curve of a run, drawn from its ``metrics.csv``: losses and learning rate against step,
with curriculum stage boundaries and rollbacks marked. :class:`LearningCurve` draws it when a fit ends (the
CLI adds it to every fit); ``distilkit plot RUN_DIR`` redraws it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from distilkit.callbacks.curriculum import CurriculumCallback
from distilkit.files import atomic_write
from distilkit.run.loggers import csv_logger, wandb_loggers

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
    figure, loss_axis = plt.subplots(figsize=(9, 5.5), layout="constrained")
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
    # the legend goes below the axes, where it covers no data; it lists the lines of both axes
    handles = [h for axis in figure.axes for h in axis.get_legend_handles_labels()[0]]
    labels = [label for axis in figure.axes for label in axis.get_legend_handles_labels()[1]]
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5) or 1, fontsize=8)
    loss_axis.set_title(f"learning curve: {metrics_csv.resolve().parent.name}")
    with atomic_write(out, "wb") as file:
        figure.savefig(file, dpi=110, format="png")
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
                (step, 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(3, 0),
                textcoords="offset points",
                rotation=90,
                va="top",
                ha="left",
                fontsize=8,
                color="tab:purple",
                annotation_clip=False,
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


class LearningCurve(Callback):
    """At the end of a fit, draw ``learning_curve.png`` beside ``metrics.csv`` (stage names from a
    :class:`CurriculumCallback` when there is one) and log it to W&B when that logger is on."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        curriculum = next((c for c in trainer.callbacks if isinstance(c, CurriculumCallback)), None)  # type: ignore[attr-defined]
        draw_run_curve(trainer, curriculum.stage_names if curriculum is not None else None)


def draw_run_curve(trainer: Any, stage_names: list[str] | None = None) -> Path | None:
    """Flush the CSV logger, draw the PNG beside ``metrics.csv``, log it to W&B if present."""
    if not trainer.is_global_zero:
        return None
    logger = csv_logger(trainer)
    if logger is None:
        return None
    logger.save()
    metrics_csv = Path(logger.metrics_file)
    if not metrics_csv.is_file():
        return None
    png = plot_learning_curve(metrics_csv, metrics_csv.with_name(PNG_NAME), stage_names)
    for wandb in wandb_loggers(trainer):
        wandb.log_image(key="learning_curve", images=[str(png)])
    return png
