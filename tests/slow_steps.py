"""A callback for subprocess tests: slows each training step and marks when a step is reached."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SlowSteps(Callback):
    def __init__(self, marker: str, at_step: int, seconds: float = 0.3) -> None:
        self.marker, self.at_step, self.seconds = Path(marker), at_step, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            self.marker.touch()
        time.sleep(self.seconds)
