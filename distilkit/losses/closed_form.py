"""Cross-entropy and forward KL with their gradient in closed form, for the chunked head loss.

The chunked loss needs, for each block of rows, the loss terms and the gradient of their weighted sum with
respect to the student's logits. Autograd gets it through log-softmax, exp, products and sums: about a dozen
passes over the ``(rows, V)`` block. For the module's default terms, cross-entropy and the forward KL of
:class:`~distilkit.losses.ForwardKLLoss`, the gradient has a closed form (q = softmax(s/T), p = softmax(t/T)):

    ∂CE/∂s = softmax(s) − onehot(label)            ∂(T²·KL(p‖q))/∂s = T·(q − p)

so total = (w_ce·CE_sum + w_kd·KD_sum) / N has the gradient

    (w_ce·(softmax(s) − onehot) + w_kd·T·(q − p)) / N,  that is  ((w_ce + w_kd)·q − w_kd·p − w_ce·onehot) / N

at T = 1, where one softmax of the student serves both terms. It is formed here in a few in-place passes
over the block; the values are the sums the reference path forms (tests hold the two equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from distilkit.losses.base import DistillationLoss
from distilkit.losses.divergences import ForwardKLLoss


@dataclass(frozen=True)
class CrossEntropyAndForwardKL:
    """The closed form of the module's own terms (a :data:`~distilkit.losses.chunked.ClosedForm`):
    ``ce_loss``, and ``kd_loss`` = ``loss`` on the teacher's logits when ``loss`` is the forward KL.

    Answers None (autograd is used) for a teacher cache's sparse targets and for a KD loss other than the
    forward KL, a subclass of :class:`ForwardKLLoss` that rewrites its divergence included.
    """

    loss: DistillationLoss

    def __call__(
        self,
        student_logits: Tensor,
        teacher: object,
        labels: Tensor,
        weights: Mapping[str, float],
        count: int,
    ) -> tuple[dict[str, Tensor], Tensor] | None:
        if teacher is not None and not (isinstance(teacher, Tensor) and self.is_forward_kl()):
            return None
        return ce_and_forward_kl(student_logits, teacher, labels, weights, count, self.loss.temperature)

    def is_forward_kl(self) -> bool:
        loss = self.loss
        return isinstance(loss, ForwardKLLoss) and type(loss).divergence is ForwardKLLoss.divergence


def ce_and_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    weights: Mapping[str, float],
    count: int,
    temperature: float = 1.0,
) -> tuple[dict[str, Tensor], Tensor]:
    """``ce_loss`` (and ``kd_loss`` with a teacher) over a block of rows, and the gradient of their weighted
    sum.

    Args:
        student_logits: ``(m, V)`` the student's logits (after its head's post-processing), any float dtype.
        teacher_logits: ``(m, V)`` the teacher's logits, or None (cross-entropy only).
        labels: ``(m,)`` next-token targets, all valid.
        weights: ``{"ce_loss": w_ce, "kd_loss": w_kd}``; a missing name weighs 0.
        count: N, the number of rows the terms are averaged over (this block is part of them).
        temperature: T of the forward KL (the KD term is T²·KL(p_T‖q_T), as in :class:`DistillationLoss`).

    Returns:
        ``({"ce_loss": Σ_rows CE / N, "kd_loss": Σ_rows T²·KL / N}, grad (m, V) float32)``, the terms float32
        scalars.
    """
    n = max(count, 1)
    w_ce, w_kd = weights.get("ce_loss", 0.0), weights.get("kd_loss", 0.0)
    rows = torch.arange(labels.numel(), device=labels.device)
    student = student_logits.float()
    log_q = student.log_softmax(-1)  # (m, V) log softmax(s)
    terms = {"ce_loss": -log_q[rows, labels].sum() / n}
    if teacher_logits is None:
        grad = log_q.exp_().mul_(w_ce / n)  # (m, V) w_ce·softmax(s) / N
    else:
        t = temperature
        log_q_t = log_q if t == 1.0 else (student / t).log_softmax(-1)  # (m, V) log q
        teacher = teacher_logits.float() if t == 1.0 else teacher_logits.float() / t
        log_p = teacher.log_softmax(-1).clamp_min_(torch.finfo(torch.float32).min)  # (m, V); -inf -> p = 0
        p = log_p.exp()  # (m, V)
        terms["kd_loss"] = torch.linalg.vecdot(p, log_p.sub_(log_q_t)).sum() * (
            t * t / n
        )  # Σ p (log p − log q)
        if t == 1.0:  # ((w_ce + w_kd)·q − w_kd·p) / N
            grad = log_q.exp_().mul_((w_ce + w_kd) / n).sub_(p, alpha=w_kd / n)
        else:  # (w_ce·softmax(s) + w_kd·T·(q − p)) / N
            grad = log_q.exp_().mul_(w_ce / n).add_(log_q_t.exp_().sub_(p), alpha=w_kd * t / n)
    grad[rows, labels] -= w_ce / n  # − w_ce·onehot / N
    return terms, grad
