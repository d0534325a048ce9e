"""Stopping a run without losing it: SIGTERM and Ctrl-C (SIGINT) write ``last.ckpt`` at the end of the
running step before the process exits; so does a teacher's server that stopped answering."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distilkit.errors import RunInterrupted
from distilkit.run.lightning_internals import run_validation_now
from distilkit.run.loggers import rewind_csv_loggers
from distilkit.teachers.http_json import TeacherUnavailable


def save_last(trainer: Trainer) -> Path | None:
    """Write ``last.ckpt`` where the run's checkpoint callback keeps it; its path (None without one)."""
    checkpoint: Any = trainer.checkpoint_callback
    if checkpoint is None or checkpoint.dirpath is None:
        return None
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
    trainer.save_checkpoint(path)
    return path


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, ``kill``), write ``last.ckpt`` before the process exits.

    Lightning stops at the end of the running step and raises ``SIGTERMException``; this writes the
    checkpoint there, so ``--ckpt_path last`` resumes exactly. The CLI then exits with status 143.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            save_last(trainer)


class CheckpointOnInterrupt(Callback):
    """Ctrl-C (SIGINT) during a fit finishes the running step, writes ``last.ckpt`` and stops with
    :class:`~distilkit.errors.RunInterrupted` (the CLI exits with status 130); a second Ctrl-C stops at once.
    Under several processes the first process's request stops all of them at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts at once
        rank_zero_info("\nCtrl-C: finishing this step and writing last.ckpt (Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = save_last(trainer)
        self._restore()
        saved = (
            f"{path} written at step {trainer.global_step}"
            if path
            else "no checkpoint callback, nothing saved"
        )
        raise RunInterrupted(f"Ctrl-C: {saved}; resume with --ckpt_path last")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class CheckpointAtEnd(Callback):
    """When a fit ends, write ``last.ckpt`` at the final step: Lightning checkpoints at validations, so a
    run whose ``max_steps`` is not a multiple of ``val_check_interval`` would lose its last steps.

    A run stopped by ``max_steps`` is saved at the end of its last batch, where the loops are mid-epoch
    (as Lightning's own step checkpoints are), so a resume continues the same epoch; a checkpoint written
    after the loops closed would resume into a new epoch."""

    def __init__(self) -> None:
        self._saved_at: int | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            save_last(trainer)
            self._saved_at = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0 and self._saved_at != trainer.global_step:
            save_last(trainer)


class CheckpointOnTeacherUnavailable(Callback):
    """A fit whose teacher's server failed for longer than its retry window
    (:class:`~distilkit.teachers.http_json.TeacherUnavailable`) writes ``last.ckpt`` and names it in the
    error's one line (the CLI exits with status 1).

    A served teacher hands a batch to the step only once its answers are in, so the failure comes between two
    steps and the checkpoint holds the last finished one: ``--ckpt_path last`` continues exactly, once the
    server answers again. A failure during a validation records that the validation is due, and the resumed
    fit runs it first (Lightning would go on without it). Before the first step nothing is written (the run
    directory is left as it was).
    """

    def __init__(self) -> None:
        self.validation_due = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, TeacherUnavailable) or trainer.state.fn != "fit":
            return
        if trainer.global_step == 0:
            exception.args = (f"{exception}; nothing was trained yet, no checkpoint written",)
            return
        self.validation_due = trainer.validating and not trainer.sanity_checking
        path = save_last(trainer)
        self.validation_due = False
        saved = (
            f"{path} written at step {trainer.global_step}; once the server answers, resume with "
            "--ckpt_path last"
            if path
            else "no checkpoint callback, nothing saved"
        )
        exception.args = (f"{exception}; {saved}",)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A fit resumed from a checkpoint written when a validation failed runs that validation first."""
        if self.validation_due:
            self.validation_due = False
            rewind_csv_loggers(trainer, trainer.global_step, evaluations_at_last=False)
            run_validation_now(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"validation_due": self.validation_due}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validation_due = bool(state_dict.get("validation_due", False))
