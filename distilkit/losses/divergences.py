"""Divergences between the teacher distribution p and the student distribution q.

Every class here gets temperature, masking and float32 math from :class:`DistillationLoss`; each writes
only its per-position formula. All are true divergences: identical logits give exactly 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from distilkit.batch import IGNORE_INDEX
from distilkit.errors import check_range
from distilkit.losses.aligned import AlignedLogits
from distilkit.losses.base import DistillationLoss, kl_from_log_probs, log_mixture
from distilkit.losses.closed_form import cross_entropy_and_forward_kl
from distilkit.losses.draws import forward_mixture_draws, reverse_mixture_draws, total_variation_draws
from distilkit.losses.partial import PartialTargets
from distilkit.losses.sparse import SparseTargets
from distilkit.losses.sparse_closed_form import cross_entropy_and_sparse_forward_kl
from distilkit.losses.workspace import in_chunk_loop


def _log_probs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log p, log q): teacher and student log-probabilities, each ``(M, V)``."""
    return teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)


class _ForwardKLRows(torch.autograd.Function):
    """KL(softmax(t) ‖ softmax(s)) per row, with the gradient formed in the forward pass.

    ∂KL/∂s = softmax(s) − softmax(t), so the backward pass is one multiply, and the forward pass reuses
    its buffers in place: about half the memory traffic of autograd through log-softmax, exp and sum.
    The teacher logits get no gradient.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        log_q = student.log_softmax(-1)  # (M, V)
        log_p = teacher.log_softmax(-1).clamp_min_(torch.finfo(teacher.dtype).min)  # (M, V); -inf -> p = 0
        p = log_p.exp()  # (M, V)
        rows = torch.linalg.vecdot(p, log_p.sub_(log_q))  # (M,) Σ p (log p − log q)
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            ctx.save_for_backward(log_q.exp_().sub_(p))  # (M, V) q − p
        return rows

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_rows: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (q_minus_p,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return q_minus_p * grad_rows.unsqueeze(-1), None


class ForwardKLLoss(DistillationLoss):
    """Forward KL, KL(p‖q) = Σ p (log p − log q): mean-seeking; the classic soft-target loss.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network". Computed by a fused
    autograd function (the gradient with respect to the student logits is q − p). From a teacher cache it
    takes top-k targets (the bucketed KL) and sampled targets or top-k targets with tail draws (the
    Monte-Carlo KL, unbiased).
    """

    sparse_modes: ClassVar[tuple[str, ...]] = ("topk", "sample")

    def kd_and_ce(
        self,
        student_logits: Tensor,
        teacher: Tensor | SparseTargets | PartialTargets | AlignedLogits,
        labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """KD and CE as :meth:`DistillationLoss.kd_and_ce`. Inside the chunked loss, when this is the plain
        forward KL (:meth:`has_closed_form`), from one softmax of the student with the gradient in closed
        form: against dense logits (:func:`~distilkit.losses.closed_form.cross_entropy_and_forward_kl`) and
        against sparse targets (:mod:`~distilkit.losses.sparse_closed_form`)."""
        fused = self.has_closed_form() and in_chunk_loop() and not torch.compiler.is_compiling()
        if isinstance(teacher, Tensor) and fused:
            ce, kd = cross_entropy_and_forward_kl(student_logits, teacher, labels, self.temperature)
            return kd, ce
        if isinstance(teacher, SparseTargets) and fused:
            self.check_sparse(teacher.mode, teacher.temperature)
            ce, kd = cross_entropy_and_sparse_forward_kl(student_logits, teacher, labels, self.temperature)
            return kd, ce
        return super().kd_and_ce(student_logits, teacher, labels)

    def has_closed_form(self) -> bool:
        """Whether this loss is the plain forward KL, whose gradient the closed form gives: a subclass that
        overrides ``divergence`` or ``forward``, or a hook on the loss, would be bypassed by it, so those
        take autograd."""
        kind = type(self)
        plain = kind.divergence is ForwardKLLoss.divergence and kind.forward is ForwardKLLoss.forward
        return plain and not (self._forward_hooks or self._forward_pre_hooks)

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # let the compiler fuse the plain formula and its gradient
            log_p, log_q = _log_probs(student_logits, teacher_logits.detach())
            return kl_from_log_probs(log_p, log_q)
        return _ForwardKLRows.apply(student_logits, teacher_logits.detach())

    def draw_divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """log p − log q at the draws."""
        return log_p - log_q


class ReverseKLLoss(DistillationLoss):
    """Reverse KL, KL(q‖p) = Σ q (log q − log p): mode-seeking.

    Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models".
    """

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_p, log_q = _log_probs(student_logits, teacher_logits)
        return kl_from_log_probs(log_q, log_p)


class SymmetricKLLoss(DistillationLoss):
    """w·KL(p‖q) + (1 − w)·KL(q‖p).

    Args:
        weight: w in [0, 1], the share of the forward KL (default 0.5).
    """

    knobs = ("temperature", "weight")

    def __init__(
        self, weight: float = 0.5, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__(temperature, ignore_index)
        self.weight = weight

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = check_range("loss.weight", value, 0.0, 1.0)

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_p, log_q = _log_probs(student_logits, teacher_logits)
        w = self.weight
        return w * kl_from_log_probs(log_p, log_q) + (1 - w) * kl_from_log_probs(log_q, log_p)


class GeneralizedJSDLoss(DistillationLoss):
    """Generalized Jensen-Shannon divergence, β·KL(p‖m) + (1 − β)·KL(q‖m) with m = β·p + (1 − β)·q.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD); the same convention as TRL's ``GKDTrainer``. The endpoints are defined as the
    limits the paper names: β = 0 gives exactly KL(p‖q) (forward) and β = 1 exactly KL(q‖p) (reverse).
    (The mixture formula itself goes to 0 at both ends, so the scale jumps there; β = 0.5 is the
    symmetric JSD.)

    Args:
        beta: β in [0, 1] (default 0.5).
    """

    knobs = ("temperature", "beta")
    sparse_modes: ClassVar[tuple[str, ...]] = ("topk", "sample")

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(temperature, ignore_index)
        self.beta = beta

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_range("loss.beta", value, 0.0, 1.0)

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_p, log_q = _log_probs(student_logits, teacher_logits)
        beta = self.beta
        if beta == 0:
            return kl_from_log_probs(log_p, log_q)
        if beta == 1:
            return kl_from_log_probs(log_q, log_p)
        log_m = log_mixture(log_p, log_q, beta)
        return beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(log_q, log_m)

    def draw_divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """β·(log p − log m) + (1 − β)·f_{KL(q‖m)} at the draws (:mod:`distilkit.losses.draws`); the second
        term lies in [−(1 − β)·log(1 − β) − β, −(1 − β)·log(1 − β)], the first is at most β·log(1/β) and, as
        the forward KL's, falls only like log(p/q) where q ≫ p. The forward KL's at β = 0."""
        beta = self.beta
        if beta == 0:
            return log_p - log_q
        forward = forward_mixture_draws(log_p, log_q, beta)
        return beta * forward + (1 - beta) * reverse_mixture_draws(log_p, log_q, 1 - beta)

    def estimates_from_draws(self) -> bool:
        """Below β = 1 (at β = 1 this is the reverse KL, whose estimate from draws is unbounded)."""
        return self.beta < 1


class SkewForwardKLLoss(DistillationLoss):
    """Skew forward KL, KL(p ‖ α·p + (1 − α)·q); α = 0 is the forward KL.

    Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models" (α = 0.1).

    Args:
        alpha: α in [0, 1] (default 0.1).
    """

    knobs = ("temperature", "alpha")
    sparse_modes: ClassVar[tuple[str, ...]] = ("topk", "sample")

    def __init__(
        self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__(temperature, ignore_index)
        self.alpha = alpha

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_range("loss.alpha", value, 0.0, 1.0)

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_p, log_q = _log_probs(student_logits, teacher_logits)
        return kl_from_log_probs(log_p, log_mixture(log_p, log_q, self.alpha))

    def draw_divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """log p − log(α·p + (1 − α)·q) at the draws, at most log(1/α)."""
        return forward_mixture_draws(log_p, log_q, self.alpha)


class SkewReverseKLLoss(SkewForwardKLLoss):
    """Skew reverse KL, KL(q ‖ α·q + (1 − α)·p); α = 0 is the reverse KL.

    Ko et al. 2024, "DistiLLM" (α = 0.1).

    Args:
        alpha: α in [0, 1] (default 0.1).
    """

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_p, log_q = _log_probs(student_logits, teacher_logits)
        return kl_from_log_probs(log_q, log_mixture(log_q, log_p, self.alpha))

    def draw_divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """f_{KL(q‖m)} at the draws, m = α·q + (1 − α)·p (:mod:`distilkit.losses.draws`), in
        [log(1/α) − (1 − α)/α, log(1/α)]."""
        return reverse_mixture_draws(log_p, log_q, self.alpha)

    def estimates_from_draws(self) -> bool:
        """Above α = 0 (at α = 0 this is the reverse KL, whose estimate from draws is unbounded)."""
        return self.alpha > 0


class TVDLoss(DistillationLoss):
    """Total variation distance, ½·Σ|p − q|.

    Used as a bounded divergence in Wen et al. 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation".
    """

    sparse_modes: ClassVar[tuple[str, ...]] = ("topk", "sample")

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
        return 0.5 * (p - q).abs().sum(-1)

    def draw_divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """(1 − q/p)_+ at the draws, in [0, 1]."""
        return total_variation_draws(log_p, log_q)


class LogitMSELoss(DistillationLoss):
    """Mean squared error between logits, mean over the vocabulary of (s − t)².

    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?" (logit matching). With T ≠ 1 the logits
    are divided by T and the result multiplied by T², as for every loss here. Needs the teacher's full
    logits: a teacher cache keeps log-probabilities of a few ids, so it is refused there.
    """

    sparse_modes: ClassVar[tuple[str, ...]] = ()

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return torch.square(student_logits - teacher_logits).mean(-1)
