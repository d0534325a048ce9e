"""What a non-finite loss term or gradient does to a run: stop it with a message, or skip the update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

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
