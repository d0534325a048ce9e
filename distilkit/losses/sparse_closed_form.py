"""Cross-entropy and forward KL against sparse teacher targets, with their gradient in closed form.

The sparse counterpart of :mod:`distilkit.losses.closed_form`, for a teacher cache's targets. Every kind
of target is, for the forward KL, a target distribution p̃ over the vocabulary given by a few entries: ids
x_i with the mass m_i each stands for, plus (top-k without draws) a mass r spread over every other id in
proportion to the student's own q_T = softmax(s/T):

- sampled targets, and top-k targets with tail draws: m_i = w_i (the weights), r = 0; the value is the
  unbiased estimate Σ_i w_i (log p(x_i) − log q_T(x_i));
- top-k targets: the teacher's (K+1) buckets, normalised as the reference normalises them (m_k = p̂_k,
  r = p̂_tail); the value is the bucketed KL Σ_k p̂_k (log p̂_k − log q_k) + p̂_tail (log p̂_tail − log q_tail),
  with q_tail = Σ_{v∉ids} q_v.

With M = Σ_i m_i + r and ρ = r / q_tail, the gradient with respect to the logits s (mean over the n rows) is

    ∂CE/∂s = (softmax(s) − onehot(label)) / n
    ∂(T²·KL)/∂s = T·(M·q_T − Σ_i m_i e_{x_i} − ρ·q_T·[v ∉ ids]) / n

so the backward pass scales the student's probabilities once and adds the entries: in place, in buffers of
the lent :class:`~distilkit.losses.workspace.Workspace`, about as many passes over the ``(n, V)`` block as the
cross-entropy alone. Autograd through :func:`~distilkit.losses.sparse.student_buckets` stays the reference
(``chunk_size: null``); tests hold the two equal.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.losses.closed_form import student_side
from distilkit.losses.workspace import scratch_space

_TINY = torch.finfo(torch.float32).tiny
_MOST_NEGATIVE = torch.finfo(torch.float32).min


class _CrossEntropyAndSparseForwardKL(torch.autograd.Function):
    """``(student (n, V), ids (n, E), mass (n, E), log_p (n, E), spread (n,) | None, labels (n,), T)
    -> (CE, T²·KL)``, means over the rows; ``spread``: log r, the mass spread over the other ids ∝ q_T."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        student: Tensor,
        ids: Tensor,
        mass: Tensor,
        log_p: Tensor,
        spread: Tensor | None,
        labels: Tensor,
        temperature: float,
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(student.device.type, enabled=False):  # float32 throughout
            buffer = scratch_space()
            n, t = max(labels.numel(), 1), temperature
            log_q1, ce, log_q = student_side(student, labels, t, buffer)  # (n, V), (), (n, V) at T
            log_q_ids = log_q.gather(-1, ids)  # (n, E)
            kd_rows = (mass * (log_p - log_q_ids)).sum(-1)  # (n,)
            total = mass.sum(-1, keepdim=True)  # (n, 1) M
            want_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
            q = log_q.exp_() if (want_grad or spread is not None) else None  # (n, V) q_T
            rho = q_ids = None
            if q is not None and spread is not None:
                q_ids = log_q_ids.exp()  # (n, E)
                q_tail = q.scatter_(-1, ids, 0.0).sum(-1).clamp_min_(_TINY)  # (n,) q is now 0 at the ids
                r = spread.exp()  # (n,)
                kd_rows += r * (spread - q_tail.log())  # r = 0 (spread at the most negative float): 0
                total += r.unsqueeze(-1)
                rho = (r / q_tail).unsqueeze(-1)  # (n, 1)
            kd = kd_rows.sum() * (t * t / n)
            if want_grad:
                q1 = q if t == 1.0 else log_q1.exp_()  # (n, V) softmax(s)
                saved = (q1, q, ids, mass, total, rho, q_ids, labels)  # rho, q_ids: None without a spread
                ctx.save_for_backward(*saved)  # type: ignore[arg-type]
                ctx.temperature, ctx.dtype = t, student.dtype  # type: ignore[attr-defined]
        return ce, kd

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_ce: Tensor, grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        q1, q, ids, mass, total, rho, q_ids, labels = ctx.saved_tensors  # type: ignore[attr-defined]
        t, n = ctx.temperature, max(labels.numel(), 1)  # type: ignore[attr-defined]
        rows = torch.arange(labels.numel(), device=labels.device)
        a, b = grad_ce / n, grad_kd * (t / n)  # 0-dim: no device sync
        at_ids = -b * mass  # (n, E) − b·m_i
        if t == 1.0:  # one softmax: (a + b·M)·q − b·ρ·q[∉ids] − b·Σ m_i e_i
            coef = a + b * total  # (n, 1)
            grad = q.mul_(coef if rho is None else coef - b * rho)
            if rho is not None:  # q is 0 at the ids: put back their (a + b·M)·q
                at_ids = at_ids + coef * q_ids
        else:  # a·softmax(s) + b·(M·q_T − ρ·q_T[∉ids] − Σ m_i e_i)
            scale = b * total if rho is None else b * (total - rho)  # (n, 1)
            grad = q1.mul_(a).add_(q.mul_(scale))
            if rho is not None:
                at_ids = at_ids + (b * total) * q_ids
        grad.scatter_add_(-1, ids, at_ids)
        grad[rows, labels] -= a
        return grad.to(ctx.dtype), None, None, None, None, None, None  # type: ignore[attr-defined]


def cross_entropy_and_sparse_forward_kl(
    student_logits: Tensor, targets: SparseTargets, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The student's cross-entropy on ``labels`` and ``T²·KL`` against sparse targets, as
    :meth:`~distilkit.losses.ForwardKLLoss.sparse_forward_and_ce` computes them (the estimate from the
    weighted entries when the targets are weighted, else the bucketed KL), with the gradient in closed form.

    Args:
        student_logits: ``(n, V)`` (any float dtype; computed in float32).
        targets: the targets at the same n positions, made at ``temperature``.
        labels: ``(n,)`` next-token targets, all valid.
        temperature: T of the KL (cross-entropy is always at T = 1, as in the module).

    Returns:
        ``(ce, kd)``, float32 means over the n rows, differentiable with respect to ``student_logits``.
    """
    if targets.weights is not None:  # sampled, or top-k with tail draws: Σ w_i (log p_i − log q_i)
        ids, mass, log_p, spread = targets.ids, targets.weights, targets.log_probs, None
    else:  # top-k: the normalised (K+1) buckets, the tail spread in proportion to q
        assert targets.tail is not None
        ids, head = targets.ids, targets.log_probs.clamp_min(_MOST_NEGATIVE)  # (n, K)
        has_tail = ids.shape[-1] < student_logits.shape[-1]
        tail = targets.tail.clamp_min(_MOST_NEGATIVE).unsqueeze(-1)  # (n, 1)
        norm = (
            torch.cat([head, tail], -1).logsumexp(-1, keepdim=True) if has_tail else head.logsumexp(-1, True)
        )
        log_p = head - norm  # (n, K)
        mass = log_p.exp()
        spread = (tail - norm).squeeze(-1).clamp_min(_MOST_NEGATIVE) if has_tail else None  # (n,)
    return _CrossEntropyAndSparseForwardKL.apply(
        student_logits, ids, mass.float(), log_p.float(), spread, labels, float(temperature)
    )
