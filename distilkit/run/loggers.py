"""Loggers that survive a resume: no rows lost, none logged twice.

A run killed after its last checkpoint has logged steps that the resumed run will log again. Lightning
logs every row at the trainer's logging step (``global_step - 1`` for the rows of optimizer step
``global_step``), so a resume from a checkpoint at ``global_step = N`` keeps the rows at logging steps
``<= N - 1`` and drops the rest:

- :class:`CSVLogger` keeps one ``metrics.csv`` per run, appends when a run resumes (Lightning's deletes the
  file), and :meth:`CSVLogger.rewind` drops its rows past the checkpoint;
- :class:`WandbLogger` logs with W&B ``step`` = the logging step (Lightning's lets W&B count rows), so the
  CLI resumes the run with W&B's rewind (``resume_from="<id>?_step=N-1"``) at exactly that point.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from distilkit.files import atomic_write

METRICS_FILE = "metrics.csv"


class CSVLogger(Logger):
    """``metrics.csv`` in ``save_dir/name/version`` (both empty by default: ``save_dir/metrics.csv``): one
    row per logging step, one column per metric (sorted), appended when a run resumes. A new metric
    rewrites the file with the wider header (atomically).

    Args:
        save_dir: the run directory.
        name: a subdirectory (default none; the CLI always writes ``RUN/metrics.csv``).
        version: a subdirectory below ``name`` (default none; no ``version_N`` numbering).
        prefix: put before every metric name (joined with ``-``).
        flush_logs_every_n_steps: rows are written to disk every this many logging calls (and at the end).
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "",
        version: int | str | None = "",
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__()
        self._save_dir = os.fspath(save_dir)
        self._name, self._version = name or "", "" if version is None else str(version)
        self._prefix = prefix
        self._flush_every = flush_logs_every_n_steps
        self._pending: list[dict[str, Any]] = []
        self._keys: list[str] | None = None  # the file's header, read when first needed
        self._last_row: tuple[int | None, dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name, self._version)

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.log_dir, METRICS_FILE)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Nothing: the CLI writes the whole resolved config as ``config.yaml``."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
        """Buffer one row. A row logged again at the same step with the same metrics (the step's row written
        before a checkpoint, :class:`~distilkit.run.RunState`, then by Lightning) is kept once: the later one,
        which may hold values logged after the checkpoint (a module's own ``on_train_batch_end``)."""
        row = {f"{self._prefix}-{k}" if self._prefix else k: _plain(v) for k, v in metrics.items()}
        last = self._last_row
        if last is not None and last[0] == step and step is not None and last[1].keys() == row.keys():
            if last[1] == row:
                return
            self._drop_last_row()
        self._last_row = (step, dict(row))
        row["step"] = step if step is not None else len(self._pending)
        self._pending.append(row)
        if len(self._pending) >= self._flush_every:
            self.save()

    def _drop_last_row(self) -> None:
        """Forget the last row logged, still buffered or already in the file."""
        if self._pending:
            self._pending.pop()
            return
        rows = self._read_rows()
        if rows:
            self._rewrite(self._header(), rows[:-1])

    @rank_zero_only
    def save(self) -> None:
        """Write the buffered rows to ``metrics.csv``."""
        if not self._pending:
            return
        keys = self._header()
        new = sorted({k for row in self._pending for k in row} - set(keys))
        if new or not os.path.isfile(self.metrics_file):
            self._rewrite(sorted([*keys, *new]), self._read_rows() + self._pending)
        else:
            with open(self.metrics_file, "a", newline="") as file:
                csv.DictWriter(file, fieldnames=keys).writerows(self._pending)
        self._pending = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    @rank_zero_only
    def rewind(self, last_step: int, evaluations_at_last: bool = True) -> int:
        """Drop the rows logged at steps after ``last_step`` (written by a run that went on past the
        checkpoint it is resumed from), and the validation rows at ``last_step`` itself unless
        ``evaluations_at_last`` (a validation that came after the checkpoint, to be run again); the file is
        replaced atomically. Returns the rows dropped."""
        self.save()
        rows = self._read_rows()

        def kept(row: dict[str, Any]) -> bool:
            step = int(float(row["step"])) if row.get("step") else None
            if step is None or step < last_step:
                return True
            validation = any(key.startswith("val/") and value for key, value in row.items())
            return step == last_step and (evaluations_at_last or not validation)

        kept_rows = [row for row in rows if kept(row)]
        if len(kept_rows) < len(rows):
            self._rewrite(self._header(), kept_rows)
        return len(rows) - len(kept_rows)

    def _header(self) -> list[str]:
        if self._keys is None:
            self._keys = []
            if os.path.isfile(self.metrics_file):
                with open(self.metrics_file, newline="") as file:
                    self._keys = list(next(csv.reader(file), []))
        return self._keys

    def _read_rows(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.metrics_file):
            return []
        with open(self.metrics_file, newline="") as file:
            return list(csv.DictReader(file))

    def _rewrite(self, keys: list[str], rows: list[dict[str, Any]]) -> None:
        with atomic_write(self.metrics_file, newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self._keys = keys


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that logs each row at W&B ``step`` = the trainer's logging step (rows of
    one step merge into one W&B row), so a resumed run can rewind W&B to its checkpoint's step.

    Rows logged without a step (tables, images) go to the latest step; a step lower than one already
    logged (which W&B would drop) is logged at the latest step, keeping ``trainer/global_step`` as given.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metric_prefix = str(kwargs.get("prefix", ""))
        self._latest_step = 0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row: dict[str, Any] = {
            f"{self._metric_prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._metric_prefix else k: v
            for k, v in metrics.items()
        }
        if step is not None:
            row["trainer/global_step"] = step
        self._latest_step = max(self._latest_step, step if step is not None else 0)
        self.experiment.log(row, step=self._latest_step)


def rewind_point(global_step: int) -> int:
    """The last logging step a checkpoint at optimizer step ``global_step`` covers."""
    return global_step - 1


def rewind_csv_loggers(trainer: Any, global_step: int, evaluations_at_last: bool = True) -> None:
    """Drop CSV rows past a checkpoint at ``global_step`` (called when a fit resumes from it); with
    ``evaluations_at_last`` False also the validation rows of the checkpoint's own step (it was written before
    that validation, which the resumed fit runs again)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.rewind(rewind_point(global_step), evaluations_at_last)


def wandb_loggers(trainer: Any) -> list[LightningWandbLogger]:
    """The trainer's W&B loggers (empty when W&B is not used)."""
    return [logger for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)]


def csv_logger(trainer: Any) -> CSVLogger | None:
    """The trainer's first CSV logger, the one that writes ``metrics.csv``."""
    return next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)


def _plain(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else value
