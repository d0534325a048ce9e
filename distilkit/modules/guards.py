"""Guards of a run: what a non-finite loss term or gradient does (stop with a message, or skip the
update), and settings refused before the first step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from distilkit.errors import ConfigError, TrainingStopped
from distilkit.models.sharding import all_finite, finite_norm
from distilkit.modules.schedules import LENGTHS

#: A step's loss terms (detached) and its batch size, kept by :meth:`NonFiniteGuard.watch`.
Watched = tuple[dict[str, Tensor], int]

Policy = Literal["stop", "skip"]


class NonFiniteGuard:
    """Counts skipped updates and raises :class:`TrainingStopped` when a run must stop.

    A step's loss terms are :meth:`watch`-ed when they are formed and checked together with the gradients
    in :meth:`check`, just before the optimizer step: one device sync per step, where the gradient check
    needs one anyway (reading the terms as soon as they are formed would stall the device before every
    backward pass).

    Args:
        policy: ``stop`` at the first non-finite value, naming the step and the term; or ``skip`` the update.
        max_skips: with ``skip``, stop after more than this many skipped steps in a row.
    """

    def __init__(self, policy: Policy = "stop", max_skips: int = 8) -> None:
        if policy not in ("stop", "skip"):
            raise ConfigError("model.nonfinite", policy, "is not a policy", "use stop or skip")
        self.policy, self.max_skips = policy, max_skips
        self.in_a_row, self.total = 0, 0
        self._watched: list[Watched] = []

    def watch(self, losses: Mapping[str, Tensor], batch_size: int) -> None:
        """Keep a step's loss terms for the next :meth:`check` (nothing is read from the device here)."""
        self._watched.append(({name: value.detach() for name, value in losses.items()}, batch_size))

    def check(
        self, strategy: Any, step: int, grads: Sequence[Tensor] = (), who: str | None = None
    ) -> list[Watched] | None:
        """Read the watched loss terms and ``grads`` (one device sync) and agree with the other processes.

        Args:
            strategy: the trainer's strategy (``reduce_boolean_decision`` combines the processes' answers).
            step: the global step, for the message.
            grads: the gradients about to be applied (none when checking a micro-batch's terms alone).
            who: the model they belong to, named in the message (a cohort's peer).

        Returns:
            The watched terms when everything is finite on every process (to be logged), else None: the update
            is to be skipped (under ``stop`` :class:`TrainingStopped` is raised instead).
        """
        watched, self._watched = self._watched, []
        names = [name for losses, _ in watched for name in losses]
        flags = [torch.isfinite(value).all() for losses, _ in watched for value in losses.values()]
        if grads:
            flags.append(finite_norm(list(grads)))
        finite = torch.stack(flags).tolist() if flags else []  # the one device sync
        bad = [name for name, ok in zip(names, finite, strict=False) if not ok]
        bad_grads = bool(grads) and not finite[-1] and not all_finite(list(grads), norm_finite=False)
        if not strategy.reduce_boolean_decision(bool(bad) or bad_grads, all=False):
            self.passed()
            return watched
        of = f" of {who}" if who else ""
        if strategy.reduce_boolean_decision(bool(bad), all=False):  # every process takes this branch
            terms = watched[-1][0] if watched else {}
            self.failed(step, f"loss terms {bad or 'on another process'}{of}", terms)
        else:
            self.failed(step, f"gradients{of}", {})
        return None

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
    """Refuse, before the first step, a learning-rate schedule whose length was given and is not the run's:
    a ``OneCycleLR(total_steps=300)`` in a 100-step run never anneals, and in a 400-step run it stops the run
    with an error at step 301; a ``CosineAnnealingLR(T_max=...)`` shorter than the run climbs back up. A
    length left out is the run's already (:mod:`distilkit.modules.schedules`). The run's length is the
    trainer's optimizer steps (``trainer.max_steps``, or epochs × batches); the module's ``scheduler_fields``
    name the setting of each schedule (``model.lr_scheduler``, or ``model.lr_schedulers[i]`` for a cohort's
    peer)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.estimated_stepping_batches
        stepped = [
            (scheduler, config.interval)
            for config in trainer.lr_scheduler_configs
            for scheduler in getattr(config.scheduler, "schedulers", [config.scheduler])
        ]
        fields = list(getattr(pl_module, "scheduler_fields", ["model.lr_scheduler"] * len(stepped)))
        for (scheduler, interval), field in zip(stepped, fields, strict=False):  # a cohort: one per peer
            found = next((v for cls, v in LENGTHS.items() if isinstance(scheduler, cls)), None)
            if found is None or interval != "step" or not math.isfinite(steps):
                continue
            horizon = int(getattr(scheduler, found))
            if horizon != int(steps):
                raise ConfigError(
                    f"{field}.init_args.{found}",
                    horizon,
                    f"is not the run's length of {int(steps)} optimizer steps (trainer.max_steps)",
                    f"leave it out (the schedule then lasts the run) or set it to {int(steps)}",
                )
