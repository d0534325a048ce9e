"""Stopping a run from outside without losing it: SIGTERM writes ``last.ckpt`` before the process exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, ``kill``), write ``last.ckpt`` before the process exits.

    Lightning stops at the end of the running step and raises ``SIGTERMException``; this writes the
    checkpoint there, so ``--ckpt_path last`` resumes exactly. The CLI then exits with status 143.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        checkpoint: Any = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None or checkpoint.dirpath is None:
            return
        trainer.save_checkpoint(Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt")
