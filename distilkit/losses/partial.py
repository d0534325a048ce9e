"""Targets at some positions only: the others learn from their labels alone.

Several teachers routed by the data (:mod:`distilkit.teachers.several`) may leave positions without a teacher
(rows that name none, when the recipe allows it). Such a chunk's teacher side is :class:`PartialTargets`: the
teacher's targets at the taught rows and a mask saying which rows those are. A loss takes the divergence at
the taught rows, and at an untaught row puts the row's cross-entropy in the KD term's place, so the row's
total, (1 − kd_ratio)·CE + kd_ratio·CE, is its cross-entropy whatever ``kd_ratio``: it learns from its label
alone, as without a teacher, and every row still counts once in each mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from distilkit.losses.sparse import SparseTargets

if TYPE_CHECKING:
    from distilkit.losses.base import DistillationLoss


@dataclass(frozen=True)
class PartialTargets:
    """A teacher's targets at the ``taught`` rows of a chunk of n rows.

    Attributes:
        taught: ``(n,)`` bool, the rows a teacher teaches.
        targets: the teacher's ``(n_t, V)`` logits or :class:`SparseTargets` at the taught rows, in order, or
            None when no row is taught.
        count: n_t, the number of taught rows (known where the mask was made, so no device sync is needed).
    """

    taught: Tensor
    targets: Tensor | SparseTargets | None
    count: int

    def kd_and_ce(
        self, loss: DistillationLoss, student_logits: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(kd, ce)`` means over the n rows: ``loss``'s KD and CE at the taught rows; at the others the
        row's cross-entropy in both.

        Args:
            loss: the KD loss.
            student_logits: ``(n, V)`` the student's logits at every row.
            labels: ``(n,)`` next-token targets.
        """
        n = max(labels.numel(), 1)
        untaught = ~self.taught
        ce_alone = F.cross_entropy(student_logits[untaught].float(), labels[untaught], reduction="sum")
        if self.targets is None or self.count == 0:
            return ce_alone / n, ce_alone / n
        kd, ce = loss.kd_and_ce(student_logits[self.taught], self.targets, labels[self.taught])
        return (kd * self.count + ce_alone) / n, (ce * self.count + ce_alone) / n
