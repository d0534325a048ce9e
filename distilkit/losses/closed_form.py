"""Cross-entropy and forward KL with their gradient in closed form, for the chunked head loss.

The chunked loss needs, for each block of rows, the loss terms and the gradient of their weighted sum with
respect to the student's logits. Autograd gets it through log-softmax, exp, products and sums: about a dozen
passes over the ``(rows, V)`` block. For the module's default terms, cross-entropy and the forward KL of
:class:`~distilkit.losses.ForwardKLLoss`, the gradient has a closed form (q = softmax(s/T), p = softmax(t/T)):

    ∂CE/∂s = softmax(s) − onehot(label)            ∂(T²·KL(p‖q))/∂s = T·(q − p)

so total = (w_ce·CE_sum + w_kd·KD_sum) / N has the gradient

    (w_ce·(softmax(s) − onehot) + w_kd·T·(q − p)) / N,  that is  ((w_ce + w_kd)·q − w_kd·p − w_ce·onehot) / N

at T = 1, where one softmax of the student serves both terms. It is formed here in place, in the buffers
that hold the logits (a :class:`~distilkit.losses.chunked.Workspace` reused from chunk to chunk): about
eight passes over the ``(rows, V)`` block and no new memory. The values are the sums the reference path
forms (tests hold the two equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from distilkit.losses.base import DistillationLoss
from distilkit.losses.chunked import TeacherChunk, Workspace
from distilkit.losses.divergences import ForwardKLLoss


@dataclass(frozen=True)
class CrossEntropyAndForwardKL:
    """The closed form of the module's own terms (a :class:`~distilkit.losses.chunked.ClosedForm`):
    ``ce_loss``, and ``kd_loss`` = ``loss`` on the teacher's logits when ``loss`` is the forward KL.

    It does not hold (autograd is used) for a teacher cache's sparse targets, nor for a KD loss other than
    the forward KL, a subclass of :class:`ForwardKLLoss` that rewrites its divergence included.
    """

    loss: DistillationLoss

    def accepts(self, teacher: TeacherChunk) -> bool:
        """Whether the closed form holds with this teacher chunk: none (CE alone), or logits (forward KL)."""
        return teacher is None or (isinstance(teacher, Tensor) and self.is_forward_kl())

    def is_forward_kl(self) -> bool:
        """The plain forward KL: a subclass that overrides ``divergence`` or ``forward``, or a hook on the
        loss, would be skipped by the closed form, so those take autograd."""
        loss, kind = self.loss, type(self.loss)
        plain = kind.divergence is ForwardKLLoss.divergence and kind.forward is ForwardKLLoss.forward
        hooked = bool(loss._forward_hooks or loss._forward_pre_hooks)
        return isinstance(loss, ForwardKLLoss) and plain and not hooked

    def __call__(
        self,
        student: Tensor,
        teacher: Tensor | None,
        labels: Tensor,
        weights: Mapping[str, float],
        count: int,
        workspace: Workspace | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        return ce_and_forward_kl_(student, teacher, labels, weights, count, self.loss.temperature, workspace)


def ce_and_forward_kl_(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    weights: Mapping[str, float],
    count: int,
    temperature: float = 1.0,
    workspace: Workspace | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """``ce_loss`` (and ``kd_loss`` with a teacher) over a block of rows, and the gradient of their weighted
    sum, formed in place: ``student`` and ``teacher`` are overwritten.

    Args:
        student: ``(m, V)`` float32, the student's logits (after its head's post-processing).
        teacher: ``(m, V)`` float32, the teacher's logits, or None (cross-entropy only).
        labels: ``(m,)`` next-token targets, all valid.
        weights: ``{"ce_loss": w_ce, "kd_loss": w_kd}``; a missing name weighs 0.
        count: N, the number of rows the terms are averaged over (these rows are part of them).
        temperature: T of the forward KL (the KD term is T²·KL(p_T‖q_T), as in :class:`DistillationLoss`).
        workspace: where the extra ``(m, V)`` buffers come from (new tensors when None).

    Returns:
        ``({"ce_loss": Σ_rows CE / N, "kd_loss": Σ_rows T²·KL / N}, grad (m, V))``: float32 scalars, and the
        gradient with respect to ``student`` (in ``student``'s memory at T = 1).
    """
    with torch.autocast(student.device.type, enabled=False):  # float32 throughout, rows dotted by bmm
        m, n, t = labels.numel(), max(count, 1), temperature
        w_ce, w_kd = weights.get("ce_loss", 0.0), weights.get("kd_loss", 0.0)
        rows = torch.arange(m, device=labels.device)

        def buffer(name: str) -> Tensor:
            return torch.empty_like(student) if workspace is None else workspace(name, m)

        if teacher is None or t == 1.0:
            log_q = torch.log_softmax(student, -1, out=student)  # (m, V)
            terms = {"ce_loss": -log_q[rows, labels].sum() / n}
            if teacher is None:
                grad = log_q.exp_().mul_(w_ce / n)  # w_ce·q / N
            else:
                log_p, p = _log_probs_and_probs(teacher, buffer("probs"))
                terms["kd_loss"] = _row_dots(p, log_p.sub_(log_q)).sum() / n  # Σ p (log p − log q)
                grad = (
                    log_q.exp_().mul_((w_ce + w_kd) / n).sub_(p, alpha=w_kd / n)
                )  # ((w_ce + w_kd)·q − w_kd·p) / N
        else:
            log_q1 = torch.log_softmax(student, -1, out=buffer("gradient"))  # (m, V) at T = 1, for CE
            terms = {"ce_loss": -log_q1[rows, labels].sum() / n}
            grad = log_q1.exp_().mul_(w_ce / n)  # w_ce·softmax(s) / N
            log_q = torch.log_softmax(student.div_(t), -1, out=student)  # (m, V) log q at T
            log_p, p = _log_probs_and_probs(teacher.div_(t), buffer("probs"))
            terms["kd_loss"] = _row_dots(p, log_p.sub_(log_q)).sum() * (t * t / n)
            grad.add_(log_q.exp_().sub_(p), alpha=w_kd * t / n)  # + w_kd·T·(q − p) / N
        grad[rows, labels] -= w_ce / n  # − w_ce·onehot / N
        return terms, grad


def _log_probs_and_probs(logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """log softmax in place in ``logits`` (−inf clamped to the most negative float: p = 0 there), and its exp
    in ``probs``."""
    log_p = torch.log_softmax(logits, -1, out=logits).clamp_min_(torch.finfo(logits.dtype).min)
    return log_p, torch.exp(log_p, out=probs)


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[i, v]·b[i, v] for every row ``(m, V), (m, V) -> (m,)``, by batched matrix products (no temporary
    the size of the inputs)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
