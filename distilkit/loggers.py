"""Loggers that survive a resume: no rows lost, none logged twice.

A run killed after its last checkpoint has logged steps that the resumed run will log again. Lightning
logs every row at the trainer's logging step (``_batches_that_stepped``: ``global_step - 1`` for the rows
of optimizer step ``global_step``), so a resume from a checkpoint at ``global_step = N`` keeps the rows at
logging steps ``<= N - 1`` and drops the rest:

- :class:`CSVLogger` appends to ``metrics.csv`` (Lightning's deletes it) and :meth:`CSVLogger.rewind`
  drops its rows past the checkpoint;
- :class:`WandbLogger` logs with W&B ``step`` = the logging step (Lightning's lets W&B count rows), so the
  CLI resumes the run with W&B's rewind (``resume_from="<id>?_step=N-1"``) at exactly that point.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


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

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Lightning's, except that a row repeated at the same step (see :func:`log_step_before_checkpoint`)
        is written once."""
        row = (step, dict(metrics))
        if row == getattr(self, "_last_row", None):
            return
        self._last_row = row
        super().log_metrics(metrics, step)

    @rank_zero_only
    def rewind(self, last_step: int) -> int:
        """Drop the rows of ``metrics.csv`` logged at steps after ``last_step`` (written by a run that went on
        past the checkpoint it is resumed from); the file is replaced atomically. Returns the rows dropped."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) <= last_step]
        if len(kept) < len(rows):
            tmp = f"{path}.rewind"
            with open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, path)
        return len(rows) - len(kept)


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that logs each row at W&B ``step`` = the trainer's logging step (rows of
    one step merge into one W&B row), so a resumed run can rewind W&B to its checkpoint's step.

    Rows logged without a step (tables, images) go to the latest step; a step lower than one already
    logged (which W&B would drop) is logged at the latest step, keeping ``trainer/global_step`` as given.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._latest_step = 0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = dict(_add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR))
        if step is not None:
            row["trainer/global_step"] = step
        self._latest_step = max(self._latest_step, step if step is not None else 0)
        self.experiment.log(row, step=self._latest_step)


def log_step_before_checkpoint(trainer: Any) -> None:
    """Write the finishing training step's row to the loggers now, before a checkpoint of that step.

    A checkpoint saved in ``on_train_batch_end`` (``every_n_train_steps``) comes before Lightning logs the
    step; a kill between the two lost that row for good, since the resumed run starts after the step.
    Lightning logs the row again afterwards: :class:`CSVLogger` drops the repeat, W&B merges rows of one
    step. Only inside ``on_train_batch_end`` (the batch processed, not yet completed) and when Lightning
    will log this step.
    """
    connector, progress = trainer._logger_connector, trainer.fit_loop.epoch_loop.batch_progress.current
    inside_batch_end = trainer.training and progress.processed > progress.completed
    if not inside_batch_end or trainer.fit_loop._should_accumulate() or not connector.should_update_logs:
        return
    connector.log_metrics(connector.metrics["log"])  # also flushes each logger (CSV written to disk)


def rewind_point(global_step: int) -> int:
    """The last logging step a checkpoint at optimizer step ``global_step`` covers."""
    return global_step - 1


def rewind_csv_loggers(trainer: Any, global_step: int) -> None:
    """Drop CSV rows past a checkpoint at ``global_step`` (called when a fit resumes from it)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.rewind(rewind_point(global_step))


def wandb_loggers(trainer: Any) -> list[LightningWandbLogger]:
    """The trainer's W&B loggers (empty when W&B is not used)."""
    return [logger for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)]


def csv_logger(trainer: Any) -> LightningCSVLogger | None:
    """The trainer's first CSV logger, the one that writes ``metrics.csv``."""
    return next((logger for logger in trainer.loggers if isinstance(logger, LightningCSVLogger)), None)
