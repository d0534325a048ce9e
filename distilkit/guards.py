"""Guards of a run: what a non-finite loss term or gradient does (stop with a message, or skip the
update), and settings refused before the first step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from distilkit.errors import ConfigError, TrainingStopped

Policy = Literal["stop", "skip"]


class NonFiniteGuard:
    """Counts skipped updates and raises :class:`TrainingStopped` when a run must stop.

    Args:
        policy: ``stop`` at the first non-finite value, naming the step and the term; or ``skip`` the update.
        max_skips: with ``skip``, stop after more than this many skipped steps in a row.
    """

    def __init__(self, policy: Policy = "stop", max_skips: int = 8) -> None:
        if policy not in ("stop", "skip"):
            raise ConfigError("model.nonfinite", policy, "is not a policy", "use stop or skip")
        self.policy, self.max_skips = policy, max_skips
        self.in_a_row, self.total = 0, 0

    def passed(self) -> None:
        """A step whose values were finite."""
        self.in_a_row = 0

    def failed(self, step: int, what: str, losses: Mapping[str, Tensor]) -> None:
        """A step with non-finite ``what``: raise under ``stop`` (or past ``max_skips``); else count it."""
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        where = f"step {step}: non-finite {what}" + (f" ({values})" if values else "")
        if self.policy == "stop":
            raise TrainingStopped(
                f"{where}. Nothing from this step was saved; lower the learning rate, check "
                "the inputs and the teacher's outputs, or set model.nonfinite: skip."
            )
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.max_skips:
            raise TrainingStopped(
                f"{where}: {self.in_a_row} steps in a row were skipped "
                f"(model.max_nonfinite_skips={self.max_skips}); training stopped."
            )


class ScheduleLengthCheck(Callback):
    """Refuse, before the first step, a learning-rate schedule whose length is not the run's: a
    ``OneCycleLR(total_steps=300)`` in a 100-step run never anneals, and in a 400-step run it stops the run
    with an error at step 301; a ``CosineAnnealingLR(T_max=...)`` shorter than the run climbs back up.
    The run's length is the trainer's optimizer steps (``trainer.max_steps``, or epochs × batches)."""

    #: scheduler class -> (its length attribute, the config field a user sets)
    HORIZONS: ClassVar[dict[type, tuple[str, str]]] = {
        torch.optim.lr_scheduler.OneCycleLR: ("total_steps", "total_steps"),
        torch.optim.lr_scheduler.CosineAnnealingLR: ("T_max", "T_max"),
    }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.estimated_stepping_batches
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            found = next((v for cls, v in self.HORIZONS.items() if isinstance(scheduler, cls)), None)
            if found is None or config.interval != "step" or not math.isfinite(steps):
                continue
            attribute, name = found
            horizon = int(getattr(scheduler, attribute))
            if horizon != int(steps):
                raise ConfigError(
                    f"model.lr_scheduler.init_args.{name}",
                    horizon,
                    f"is not the run's length of {int(steps)} optimizer steps (trainer.max_steps)",
                    f"set it to {int(steps)} when you change trainer.max_steps",
                )
