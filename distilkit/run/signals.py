"""Stopping a run from outside without losing it: SIGTERM and Ctrl-C (SIGINT) write ``last.ckpt`` at the
end of the running step before the process exits, and so does a teacher's server that stopped answering;
other long commands keep what they computed (:class:`GracefulStop`)."""

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
    trainer.save_checkpoint(path, weights_only=False)  # the whole run state, as Lightning's own saves
    return path


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, ``kill``), write ``last.ckpt`` before the process exits.

    Lightning stops at the end of the running step and raises ``SIGTERMException``; this writes the
    checkpoint there, so ``--ckpt_path last`` resumes exactly. The CLI then exits with status 143.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            save_last(trainer)


class GracefulStop:
    """Ctrl-C (SIGINT) asks the work in progress to stop at its next safe point instead of at once, so what it
    has computed is kept: a fit finishes its step and writes ``last.ckpt``, ``distilkit cache`` writes the
    blocks it holds, ``generate`` keeps the samples it has, ``evaluate`` the models it has scored. The work
    polls :attr:`requested` (or :meth:`agreed`, under several processes) and raises
    :class:`~distilkit.errors.RunInterrupted` (the CLI exits with status 130). A second Ctrl-C stops at once
    (RunInterrupted from the handler, naming ``at_once``).

    A context manager (or :meth:`start` / :meth:`stop`): the handler is installed on entry in the main thread
    and the previous one restored on exit.

    Args:
        finishing: what the first Ctrl-C lets finish, said in one line (``"this step, then writing
            last.ckpt"``).
        at_once: what a second Ctrl-C leaves (``"last.ckpt is the previous checkpoint"``).
    """

    def __init__(self, finishing: str, at_once: str) -> None:
        self.finishing, self.at_once = finishing, at_once
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def start(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread() and not self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def stop(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def __enter__(self) -> GracefulStop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def agreed(self, strategy: Any = None) -> bool:
        """Whether to stop now: this process was asked to, or (under several processes, given the trainer's
        ``strategy``) any process was, so that all stop at the same point."""
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            return bool(strategy.reduce_boolean_decision(self.requested, all=False))
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.stop()
            raise RunInterrupted(f"Ctrl-C twice: stopped at once; {self.at_once}")
        self.requested = True
        rank_zero_info(f"\nCtrl-C: finishing {self.finishing} (Ctrl-C again to stop at once)")


def stop_at_once(signum: int, frame: FrameType | None) -> None:
    """The CLI's SIGINT handler outside the work a :class:`GracefulStop` guards: stop now, as a
    :class:`~distilkit.errors.RunInterrupted` (not a KeyboardInterrupt, which Lightning turns into exit
    status 1 with a message of its own)."""
    raise RunInterrupted("Ctrl-C: stopped at once")


class CheckpointOnInterrupt(Callback):
    """Ctrl-C (SIGINT) during a fit finishes the running step, writes ``last.ckpt`` and stops with
    :class:`~distilkit.errors.RunInterrupted` (the CLI exits with status 130); a second Ctrl-C stops at once.
    Under several processes the first process's request stops all of them at the same step."""

    def __init__(self) -> None:
        self.stop = GracefulStop("this step, then writing last.ckpt", "last.ckpt is the previous checkpoint")

    @property
    def requested(self) -> bool:
        return self.stop.requested

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self.stop.agreed(trainer.strategy):
            return
        path = save_last(trainer)
        self.stop.stop()
        saved = (
            f"{path} written at step {trainer.global_step}"
            if path
            else "no checkpoint callback, nothing saved"
        )
        raise RunInterrupted(f"Ctrl-C: {saved}; resume with --ckpt_path last")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.stop.stop()


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
