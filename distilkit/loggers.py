"""A CSV logger that appends to a run's ``metrics.csv`` instead of deleting it on resume."""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's writer removes an existing ``metrics.csv`` when it starts; this one keeps its rows and
    header, so a resumed run continues the same file (new columns still rewrite the header)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` with :class:`AppendingExperimentWriter`: one ``metrics.csv`` per run."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


def wandb_loggers(trainer: Any) -> list[WandbLogger]:
    """The trainer's W&B loggers (empty when W&B is not used)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def csv_logger(trainer: Any) -> LightningCSVLogger | None:
    """The trainer's first CSV logger, the one that writes ``metrics.csv``."""
    return next((logger for logger in trainer.loggers if isinstance(logger, LightningCSVLogger)), None)
