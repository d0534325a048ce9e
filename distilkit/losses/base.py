"""The contract every logit-distillation loss keeps."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilkit.batch import IGNORE_INDEX
from distilkit.errors import ConfigError
from distilkit.losses.aligned import AlignedLogits
from distilkit.losses.partial import PartialTargets
from distilkit.losses.sparse import (
    SparseTargets,
    check_sparse_mode,
    draw_estimate,
    student_buckets,
    teacher_buckets,
)


class DistillationLoss(nn.Module):
    """Base of the logit-distillation losses: temperature, masking and float32 math live here.

    A subclass writes only :meth:`divergence`, the per-position divergence between two rows of
    temperature-scaled float32 logits. ``forward`` then returns

        T² · mean over unmasked positions i of divergence(s_i / T, t_i / T)

    (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the T² keeps gradient size
    independent of T). The result is exactly 0, with a gradient path, when every position is masked.

    A subclass with settings of its own lists them in :attr:`knobs` (validated by their property setters):
    those are what a curriculum stage may change between steps.

    :meth:`sparse_forward` computes the same from sparse teacher targets (an offline teacher cache, see
    :mod:`distilkit.losses.sparse`): on top-k targets the divergence is applied to the (K+1)-bucket
    distributions; on sampled targets (and top-k targets with tail draws) a loss that writes
    :meth:`draw_divergence` (a function of the draw whose mean under p is the divergence) takes the weighted
    mean over the draws, an unbiased estimate. :attr:`sparse_modes` names the kinds of targets a loss accepts.

    Args:
        temperature: softening temperature T > 0 (default 1.0). Settable between steps (a curriculum does).
        ignore_index: label value whose positions are skipped (default -100, the Hugging Face convention).
    """

    #: Settings a curriculum stage may set between steps; each validates the values it is given.
    knobs: ClassVar[tuple[str, ...]] = ("temperature",)

    #: Kinds of sparse targets (:class:`SparseTargets` modes) this loss can be computed from; empty for a
    #: loss that needs the teacher's full logits. A subclass that changes :meth:`divergence` keeps
    #: ``("topk",)`` (any divergence applies to bucketed distributions) unless it needs full logits;
    #: ``"sample"`` is for a loss that writes :meth:`draw_divergence`.
    sparse_modes: ClassVar[tuple[str, ...]] = ("topk",)

    #: Whether the teacher's logits may have another vocabulary (last dimension) than the student's: true for
    #: the losses that compare distributions over two vocabularies (:mod:`distilkit.losses.cross_tokenizer`).
    cross_vocabulary: ClassVar[bool] = False

    def __init__(self, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError("loss.temperature", value, "must be a finite number > 0", "use e.g. 1.0 or 2.0")
        self._temperature = float(value)

    def set_knob(self, name: str, value: float) -> None:
        """Set one of :attr:`knobs` (its setter validates ``value``)."""
        if name not in self.knobs:
            raise ConfigError(
                f"knob {name}",
                value,
                f"is not a knob of {type(self).__name__}",
                f"use one of {list(self.knobs)}",
            )
        setattr(self, name, value)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mean divergence over unmasked positions.

        Args:
            student_logits: ``(..., V)`` logits of the student, any float dtype, already aligned.
            teacher_logits: ``(..., V)`` logits of the teacher, same shape (``(..., V_t)`` for a loss with
                :attr:`cross_vocabulary`).
            labels: ``(...)`` optional; positions equal to ``ignore_index`` are skipped (no other use).

        Returns:
            A float32 scalar.
        """
        leading_only = self.cross_vocabulary  # the vocabularies (last dimensions) may differ
        if (student_logits.shape[:-1] if leading_only else student_logits.shape) != (
            teacher_logits.shape[:-1] if leading_only else teacher_logits.shape
        ):
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} must have the same "
                + ("leading dimensions" if leading_only else "shape")
            )
        student = student_logits.reshape(-1, student_logits.shape[-1])  # (N, V)
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (N, V), or (N, V_t)
        if labels is not None:
            keep = labels.reshape(-1) != self.ignore_index  # (N,)
            if not bool(keep.all()):  # skip the copy when nothing is masked (the chunked path)
                student, teacher = student[keep], teacher[keep]  # (M, V)
        t = self.temperature
        student, teacher = student.float(), teacher.float()
        if t != 1.0:
            student, teacher = student / t, teacher / t
        per_position = self.divergence(student, teacher)  # (M,)
        return per_position.sum() / max(per_position.numel(), 1) * (t * t)

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-position divergence of float32, temperature-scaled logits ``(M, V)`` -> ``(M,)``."""
        raise NotImplementedError

    def kd_and_ce(
        self,
        student_logits: Tensor,
        teacher: Tensor | SparseTargets | PartialTargets | AlignedLogits,
        labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """KD against the teacher's logits or sparse targets, and the student's cross-entropy on ``labels``:
        the module's two terms, from one call (a loss may compute both from one softmax).

        Args:
            student_logits: ``(n, V)`` logits of the student.
            teacher: the teacher's ``(n, V)`` logits, or its :class:`SparseTargets` at the same positions, or
                :class:`~distilkit.losses.partial.PartialTargets` (rows without a teacher learn from their
                labels alone), or a teacher with another tokenizer's
                :class:`~distilkit.losses.aligned.AlignedLogits` (see :meth:`aligned_forward_and_ce`).
            labels: ``(n,)`` next-token targets, every one a token (the chunked loss has removed the masked
                positions: checking here would cost a device sync per chunk).

        Returns:
            ``(kd, ce)``, float32 means over the n positions (CE at temperature 1).
        """
        if isinstance(teacher, PartialTargets):
            return teacher.kd_and_ce(self, student_logits, labels)
        if isinstance(teacher, SparseTargets):
            return self.sparse_forward_and_ce(student_logits, teacher, labels)
        if isinstance(teacher, AlignedLogits):
            return self.aligned_forward_and_ce(student_logits, teacher, labels)
        return self(student_logits, teacher), cross_entropy(student_logits, labels, self.ignore_index)

    def aligned_forward_and_ce(
        self, student_logits: Tensor, teacher: AlignedLogits, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """KD at the compared rows of a chunk against a teacher with another tokenizer, and the student's
        cross-entropy on every row.

        KD = (Σ over the chunk's m compared rows of the divergence) / n · N / M, so that with the chunk
        loop's n / N weight the batch's KD is the mean over its M compared positions
        (:mod:`distilkit.losses.aligned`); m = 0 gives 0 with a gradient path.

        Args:
            student_logits: ``(n, V_s)`` logits of the student.
            teacher: the teacher's ``(m, V_t)`` logits at the compared rows and which rows they are.
            labels: ``(n,)`` next-token targets.

        Returns:
            ``(kd, ce)``, float32 scalars.
        """
        rows = teacher.compared.nonzero().squeeze(-1)  # (m,)
        mean = self(student_logits.index_select(0, rows), teacher.logits)  # over the m rows
        kd = mean * rows.numel() * teacher.scale / max(labels.numel(), 1)
        return kd, cross_entropy(student_logits, labels, self.ignore_index)

    def has_closed_form(self) -> bool:
        """Whether :meth:`kd_and_ce` takes its gradient in closed form in the chunked loss (the plain forward
        KL does; see :class:`~distilkit.losses.ForwardKLLoss`)."""
        return False

    def sparse_forward(
        self, student_logits: Tensor, targets: SparseTargets, labels: Tensor | None = None
    ) -> Tensor:
        """Mean divergence over unmasked positions from sparse teacher targets instead of teacher logits.

        T² · mean over unmasked positions of :meth:`sparse_divergence`, in float32, as :meth:`forward`.

        Args:
            student_logits: ``(..., V)`` logits of the student, any float dtype, already aligned.
            targets: the teacher's targets at the same positions (leading dims ``...``), made at this
                loss's temperature.
            labels: ``(...)`` optional; positions equal to ``ignore_index`` are skipped.

        Returns:
            A float32 scalar.

        Raises:
            ConfigError: the loss cannot use targets of this mode, or their temperature differs.
        """
        self.check_sparse(targets.mode, targets.temperature)
        student, targets = self._sparse_rows(student_logits, targets)  # (N, V), (N, K)
        if labels is not None:
            keep = labels.reshape(-1) != self.ignore_index  # (N,)
            if not bool(keep.all()):
                student, targets = student[keep], targets[keep]  # (M, V), (M, K)
        t = self.temperature
        student = student.float() / t if t != 1.0 else student.float()
        per_position = self.sparse_divergence(student, targets)  # (M,)
        return per_position.sum() / max(per_position.numel(), 1) * (t * t)

    def sparse_divergence(self, student_logits: Tensor, targets: SparseTargets) -> Tensor:
        """Per-position divergence of float32, temperature-scaled student logits ``(M, V)`` from sparse
        targets ``(M, E)`` -> ``(M,)``: the weighted mean of :meth:`draw_divergence` over the entries
        (weighted targets, a loss that has it), else :meth:`divergence` on the (K+1)-bucket distributions."""
        self.check_sparse(targets.mode)
        draws = self.uses_draws(targets)
        return self.bucket_divergence(student_buckets(student_logits, targets, draws=draws)[0], targets)

    def bucket_divergence(self, student: Tensor, targets: SparseTargets) -> Tensor:
        """Per-position divergence ``(M,)`` from the student's bucket log-probabilities (see
        :func:`~distilkit.losses.sparse.student_buckets`, with ``draws=self.uses_draws(targets)``) and the
        targets."""
        if self.uses_draws(targets):
            return draw_estimate(self.draw_divergence(targets.log_probs, student), targets)
        return self.divergence(student, teacher_buckets(targets, tail=student.shape[-1] > targets.head))

    def draw_divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """f(x) at draws x ∼ p such that E_{x∼p}[f(x)] is this divergence, from the teacher's and the
        student's log-probabilities at the draws ``(M, E)`` (temperature-scaled) -> ``(M, E)``. Written by the
        losses that list ``"sample"`` in :attr:`sparse_modes`; the estimate Σ_i w_i f(x_i) and its gradient
        are then unbiased (the draws do not depend on the student)."""
        raise NotImplementedError(f"{type(self).__name__} has no estimate from the teacher's draws")

    def estimates_from_draws(self) -> bool:
        """Whether :meth:`draw_divergence` gives a bounded estimate at the present settings (a knob may make
        it unbounded, e.g. the generalized JSD at β = 1, the reverse KL)."""
        return "sample" in self.sparse_modes

    def uses_draws(self, targets: SparseTargets) -> bool:
        """Whether the divergence from ``targets`` is the estimate from their weighted entries (sampled
        targets, top-k with tail draws) rather than the (K+1) buckets."""
        return targets.weighted and self.estimates_from_draws()

    def sparse_forward_and_ce(
        self, student_logits: Tensor, targets: SparseTargets, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """KD from sparse targets (as :meth:`sparse_forward`) and the student's cross-entropy on ``labels``.

        CE = mean over unmasked positions of −log softmax(student)[label], at temperature 1 as in the
        module. At T = 1 both come from one softmax of the student's logits (one pass over ``(N, V)``
        where two separate losses make two); at other temperatures they are computed apart.

        Args:
            student_logits: ``(..., V)`` logits of the student.
            targets: the teacher's targets at the same positions.
            labels: ``(...)`` next-token targets; positions equal to ``ignore_index`` are skipped.

        Returns:
            ``(kd, ce)``, float32 scalars.
        """
        self.check_sparse(targets.mode, targets.temperature)
        student, targets = self._sparse_rows(student_logits, targets)  # (N, V), (N, K)
        labels = labels.reshape(-1)  # (N,)
        keep = labels != self.ignore_index  # (N,)
        if not bool(keep.all()):
            student, targets, labels = student[keep], targets[keep], labels[keep]  # (M, ...)
        count, t = max(labels.numel(), 1), self.temperature
        student = student.float()
        if t != 1.0:
            ce = F.cross_entropy(student, labels, reduction="sum") / count
            return self.sparse_divergence(student / t, targets).sum() / count * (t * t), ce
        buckets, label_log_probs = student_buckets(
            student, targets, extra=labels.unsqueeze(-1), draws=self.uses_draws(targets)
        )
        assert label_log_probs is not None
        return self.bucket_divergence(buckets, targets).sum() / count, -label_log_probs.sum() / count

    @staticmethod
    def _sparse_rows(student_logits: Tensor, targets: SparseTargets) -> tuple[Tensor, SparseTargets]:
        """``(..., V)`` logits and ``(..., K)`` targets as ``(N, V)`` and ``(N, K)`` rows."""
        if student_logits.shape[:-1] != targets.ids.shape[:-1]:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and targets {tuple(targets.ids.shape)} "
                "cover different positions"
            )
        return student_logits.reshape(-1, student_logits.shape[-1]), targets.flatten()

    def check_sparse(self, mode: str, temperature: float | None = None) -> None:
        """Refuse, with a ConfigError, targets of ``mode`` this loss cannot use, or made at another
        temperature (call it before training from a cache to fail early)."""
        check_sparse_mode(type(self).__name__, self.sparse_modes, mode, self.estimates_from_draws())
        if temperature is not None and not math.isclose(temperature, self.temperature, rel_tol=1e-9):
            raise ConfigError(
                "loss.temperature",
                self.temperature,
                f"differs from the temperature the teacher's targets were made at ({temperature})",
                f"set loss.temperature to {temperature}, or remake the cache at {self.temperature}",
            )


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy of ``logits (n, V)`` on ``labels (n,)`` in float32, over the positions
    not equal to ``ignore_index``; exactly 0 (with a gradient path) when there are none."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)  # a tensor: no device sync


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) along the last axis; rows ``(M, V)`` -> ``(M,)``.

    Terms with p_v = 0 count as 0 (the limit): ``-inf`` in ``log_p`` (a masked vocabulary entry) is
    clamped to the most negative float, where p_v = exp(log p_v) is exactly 0, so the row stays finite.
    """
    log_p = log_p.clamp_min(torch.finfo(log_p.dtype).min)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) from log a and log b, stable for w in [0, 1]."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
