"""Cross-entropy and forward KL from one softmax, with their gradient in closed form.

The module's default terms are the student's cross-entropy on the labels and the forward KL of
:class:`~distilkit.losses.ForwardKLLoss`. Autograd gets their gradient through log-softmax, exp, products and
sums: about a dozen passes over each ``(rows, V)`` block. The gradient has a closed form
(q = softmax(s/T), p = softmax(t/T), mean over the n rows):

    ∂CE/∂s = (softmax(s) − onehot(label)) / n            ∂(T²·KL(p‖q))/∂s = T·(q − p) / n

:func:`cross_entropy_and_forward_kl` computes both terms from one log-softmax of the student at T = 1 and
keeps q and p for the backward pass, which forms ``g_ce·∂CE/∂s + g_kd·∂KD/∂s`` in place: about eight
passes over the block in all, in buffers of the lent :class:`~distilkit.losses.workspace.Workspace`. It is an
autograd function, so whatever is built on the two terms (a subclass's extra terms, weights, the chunked
loss) gets its gradient by autograd as usual; tests hold it equal to autograd through the definitions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from distilkit.losses.workspace import scratch_space


class _CrossEntropyAndForwardKL(torch.autograd.Function):
    """``(student (n, V), teacher (n, V), labels (n,), T) -> (CE, T²·KL(p_T‖q_T))``, means over the rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, student: Tensor, teacher: Tensor, labels: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(student.device.type, enabled=False):  # float32 throughout
            buffer = scratch_space()
            n, t = max(labels.numel(), 1), temperature
            log_q1, ce, log_q = student_side(student, labels, t, buffer)
            log_p = log_softmax_scaled(teacher.float(), t, buffer("log_p", log_q1))  # (n, V)
            p = torch.exp(log_p, out=buffer("p", log_q1))  # (n, V)
            kd = row_dots(p, log_p.sub_(log_q)).sum() * (t * t / n)  # T²·Σ p (log p − log q) / n
            if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
                q1 = log_q1.exp_()  # (n, V) softmax(s)
                q = q1 if t == 1.0 else log_q.exp_()  # (n, V) softmax(s/T)
                ctx.save_for_backward(q1, q, p, labels)
                ctx.temperature, ctx.dtype = t, student.dtype  # type: ignore[attr-defined]
        return ce, kd

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_ce: Tensor, grad_kd: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        q1, q, p, labels = ctx.saved_tensors  # type: ignore[attr-defined]
        t, n = ctx.temperature, max(labels.numel(), 1)  # type: ignore[attr-defined]
        rows = torch.arange(labels.numel(), device=labels.device)
        a, b = grad_ce / n, grad_kd * (t / n)  # 0-dim: no device sync
        # T = 1: one softmax serves both, (a + b)·q − b·p; else a·softmax(s) + b·(q − p); then − a·onehot
        grad = q1.mul_(a + b).sub_(p.mul_(b)) if t == 1.0 else q1.mul_(a).add_(q.sub_(p).mul_(b))
        grad[rows, labels] -= a
        return grad.to(ctx.dtype), None, None, None  # type: ignore[attr-defined]


def cross_entropy_and_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The student's cross-entropy on ``labels`` and the forward KL ``T²·KL(softmax(t/T)‖softmax(s/T))``.

    Args:
        student_logits: ``(n, V)`` (any float dtype; computed in float32).
        teacher_logits: ``(n, V)``; a ``-inf`` entry is a token the teacher never predicts (p = 0).
        labels: ``(n,)`` next-token targets, all valid.
        temperature: T of the KL (cross-entropy is always at T = 1, as in the module).

    Returns:
        ``(ce, kd)``, float32 means over the n rows, differentiable with respect to ``student_logits``.
    """
    return _CrossEntropyAndForwardKL.apply(
        student_logits, teacher_logits.detach(), labels, float(temperature)
    )


def student_side(
    student: Tensor, labels: Tensor, temperature: float, buffer: Callable[[str, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """What every closed form opens with, in float32 and the workspace's ``buffer``s: log softmax(s)
    ``(n, V)``, the mean cross-entropy of ``labels`` ``()``, and log softmax(s/T) ``(n, V)`` (the same tensor
    at T = 1)."""
    s = student.float()
    rows = torch.arange(labels.numel(), device=labels.device)
    log_q1 = torch.log_softmax(s, -1, out=buffer("log_q", s))  # (n, V) at T = 1
    ce = -log_q1[rows, labels].sum() / max(labels.numel(), 1)
    log_q = log_q1 if temperature == 1.0 else log_softmax_scaled(s, temperature, buffer("log_q_t", s))
    return log_q1, ce, log_q


def log_softmax_scaled(logits: Tensor, temperature: float, out: Tensor) -> Tensor:
    """``log_softmax(logits / T)`` into ``out``, with ``-inf`` clamped to the most negative float (there p = 0
    exactly and ``p · log p`` stays 0)."""
    scaled = logits if temperature == 1.0 else torch.div(logits, temperature, out=out)
    return torch.log_softmax(scaled, -1, out=out).clamp_min_(torch.finfo(out.dtype).min)


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[i, v]·b[i, v] for every row ``(m, V), (m, V) -> (m,)``, by batched matrix products (no temporary
    the size of the inputs)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
