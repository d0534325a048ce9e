"""Learning-rate schedules that follow the run: a schedule given no length lasts the run's optimizer steps.

A recipe names a scheduler by ``class_path`` and may leave its length out (``total_steps`` of ``OneCycleLR``;
``T_max`` of :class:`CosineAnnealingLR` below): :func:`build_scheduler` then gives it the run's number of
optimizer steps (``trainer.estimated_stepping_batches``), so ``--trainer.max_steps N`` alone shortens any
recipe. A length given explicitly is kept (and refused before the first step by
:class:`~distilkit.modules.guards.ScheduleLengthCheck` when it is not the run's).

torch's ``OneCycleLR`` divides by zero when a phase has no steps (``pct_start · total_steps`` = 1, e.g.
``pct_start: 0.05`` in a 20-step run); such a warm-up is made two steps long (said in one line).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

#: scheduler class -> the keyword that holds its length (filled with the run's when left out or None).
LENGTHS: dict[type, str] = {
    torch.optim.lr_scheduler.OneCycleLR: "total_steps",
    torch.optim.lr_scheduler.CosineAnnealingLR: "T_max",
}


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's ``CosineAnnealingLR`` whose ``T_max`` may be left out: it is then the run's optimizer steps
    (torch's own requires it, so a recipe that leaves it out names this class)."""

    def __init__(
        self, optimizer: Optimizer, T_max: int | None = None, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        if T_max is None:
            raise ValueError("T_max: give it, or build the scheduler with build_scheduler (the run's length)")
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min, last_epoch=last_epoch)


def scheduler_class(factory: Any) -> type | None:
    """The scheduler class a factory builds: the class itself, or the class a ``functools.partial`` (as
    jsonargparse and Lightning make them) wraps; None when it cannot be told (a plain function)."""
    if isinstance(factory, type):
        return factory
    if isinstance(factory, functools.partial):
        for candidate in (factory.func, *factory.args):
            if isinstance(candidate, type) and issubclass(candidate, torch.optim.lr_scheduler.LRScheduler):
                return candidate
    return None


def build_scheduler(factory: Any, optimizer: Optimizer, run_steps: float) -> Any:
    """``factory(optimizer)``, with the run's length filled in where the schedule's is left out.

    Args:
        factory: builds the scheduler from the optimizer (a class, or a partial of one with its settings).
        optimizer: the optimizer it schedules.
        run_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``; inf when unknown).
    """
    cls = scheduler_class(factory)
    keywords = dict(getattr(factory, "keywords", None) or {})
    length = next((name for kind, name in LENGTHS.items() if cls is not None and issubclass(cls, kind)), None)
    extra: dict[str, Any] = {}
    by_epochs = length == "total_steps" and keywords.get("epochs") and keywords.get("steps_per_epoch")
    if length is not None and keywords.get(length) is None and math.isfinite(run_steps) and not by_epochs:
        extra[length] = int(run_steps)
    if cls is not None and issubclass(cls, torch.optim.lr_scheduler.OneCycleLR):
        extra |= _one_cycle_warm_up(keywords, extra.get("total_steps", keywords.get("total_steps")))
    return factory(optimizer, **extra)


def _one_cycle_warm_up(keywords: dict[str, Any], total: int | None) -> dict[str, Any]:
    """``{"pct_start": p}`` when the given ``pct_start`` makes a phase of zero steps, where torch divides
    by zero (the warm-up ending exactly at step 0, or at the last step): a two-step warm-up instead (none in a
    run of under three steps); else nothing."""
    pct = float(keywords.get("pct_start", 0.3))
    if total is None or keywords.get("three_phase"):
        return {}
    warm_up_end = float(pct * total) - 1
    if warm_up_end != 0 and warm_up_end != total - 1:
        return {}
    fixed = 2 / total if total >= 3 else 0.0
    rank_zero_info(
        f"distilkit: OneCycleLR's pct_start={pct} leaves a phase of no steps in a {total}-step run; "
        f"using pct_start={fixed:g}"
    )
    return {"pct_start": fixed}
