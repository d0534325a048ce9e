"""GOLD per row (:class:`~distilkit.losses.cross_tokenizer.GOLDLoss`): the plain formula, and the same with
its gradient formed in the forward pass.

With the shared tokens S (pairs of a student and a teacher id), p = softmax(t) over the teacher's V_t,
q = softmax(s) over the student's V_s, P_S = Σ_{k∈S} p_k, Q_S = Σ_{k∈S} q_k, and the rest of each side
(p_rest, q_rest: the tokens outside S):

    GOLD = w_exact · P_S · KL(p̃ ‖ q̃)  +  w_uld · Σ_i |sort↓(p_rest)_i − sort↓(q_rest)_i|,
    p̃ = p_S / P_S,   q̃ = q_S / Q_S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distilkit.data.vocabulary import VocabularyMap
from distilkit.losses.base import kl_from_log_probs
from distilkit.losses.closed_form import row_dots
from distilkit.losses.sorted_l1 import sorted_l1, sorted_l1_and_signs
from distilkit.losses.workspace import Scratch, scratch_space

#: Below this shared mass Q_S of the student, a row's exact term is taken by the plain formula, from the
#: logits: the difference form below loses about ε·|log Q_S|·P_S to rounding, and float32 sums of
#: exponentials lose everything near 1e-38.
SMALLEST_SHARED_MASS = 1e-6


@dataclass(frozen=True)
class Columns:
    """A vocabulary mapping as the column indices the row kernels use, for logits of V_s and V_t entries.

    Attributes:
        shared: K.
        student_order: ``(V_s,)`` the student's shared ids (in the mapping's pair order), then its other ids.
        teacher_order: ``(V_t,)`` the same for the teacher: after one gather of each side by these, the first
            K columns pair up and the rest follow.
        teacher_of_student: ``(V_s,)`` for each student id, the teacher id it pairs with (0 where unshared).
        student_shared: ``(V_s,)`` float, 1 on the student's shared ids, 0 elsewhere.
    """

    shared: int
    student_order: Tensor
    teacher_order: Tensor
    teacher_of_student: Tensor
    student_shared: Tensor

    @classmethod
    def of(cls, mapping: VocabularyMap, student_size: int, teacher_size: int) -> Columns:
        """The columns of ``mapping`` for logits this wide (at least the mapping's sizes; the extra ids of a
        wider head are unshared)."""
        teacher_of_student = torch.zeros(student_size, dtype=torch.long)
        teacher_of_student[mapping.student_ids] = mapping.teacher_ids
        student_shared = torch.zeros(student_size)
        student_shared[mapping.student_ids] = 1.0
        return cls(
            mapping.shared,
            _shared_first(mapping.student_ids, student_size),
            _shared_first(mapping.teacher_ids, teacher_size),
            teacher_of_student,
            student_shared,
        )

    @property
    def student_rest(self) -> Tensor:
        """``(V_s − K,)`` the student's unshared ids, increasing."""
        return self.student_order[self.shared :]

    @property
    def teacher_rest(self) -> Tensor:
        """``(V_t − K,)`` the teacher's unshared ids, increasing."""
        return self.teacher_order[self.shared :]

    def to(self, device: torch.device) -> Columns:
        indices = (self.student_order, self.teacher_order, self.teacher_of_student, self.student_shared)
        return Columns(self.shared, *(index.to(device) for index in indices))


def _shared_first(ids: Tensor, size: int) -> Tensor:
    """``(size,)``: ``ids``, then the ids in ``[0, size)`` not among them, increasing."""
    rest = torch.ones(size, dtype=torch.bool)
    rest[ids] = False
    return torch.cat([ids, rest.nonzero().squeeze(-1)])


def gold_rows(student: Tensor, teacher: Tensor, columns: Columns, weights: tuple[float, float]) -> Tensor:
    """GOLD per row, the plain formula: ``(M, V_s)``, ``(M, V_t)`` logits -> ``(M,)`` (autograd for the
    gradient; :class:`GOLDRows` computes the same with its gradient in closed form)."""
    k = columns.shared
    teacher = teacher.index_select(-1, columns.teacher_order)  # (M, V_t), shared columns first
    student = student.index_select(-1, columns.student_order)  # (M, V_s), shared columns first
    log_total_p = teacher.logsumexp(-1, keepdim=True)  # (M, 1)
    exact = torch.zeros_like(log_total_p.squeeze(-1))  # (M,)
    if k:
        mass = (teacher[:, :k].logsumexp(-1) - log_total_p.squeeze(-1)).exp()  # (M,) P_S
        # P_S = 0: no shared mass, nothing to compare; log p̃ (NaN where every shared logit is -inf) is set
        # to 0 there, or its NaN would reach the gradient through the branch torch.where does not take
        log_p = torch.where(mass.unsqueeze(-1) > 0, teacher[:, :k].log_softmax(-1), 0.0)  # (M, K) log p̃
        kl = kl_from_log_probs(log_p, student[:, :k].log_softmax(-1))  # (M,) KL(p̃‖q̃)
        exact = torch.where(mass > 0, mass * kl, exact)
    p_rest = (teacher[:, k:] - log_total_p).exp()  # (M, V_t − K)
    q_rest = student.softmax(-1)[:, k:]  # (M, V_s − K)
    return weights[0] * exact + weights[1] * sorted_l1(p_rest, q_rest)


class GOLDRows(torch.autograd.Function):
    """:func:`gold_rows` of float32 logits with the gradient with respect to the student's logits formed in
    the forward pass, in the student's own column order (no reordering of either side's whole rows).

    The exact term from the log-probabilities over each whole vocabulary (log p, log q: one log-softmax per
    side), with log p gathered into the student's columns:

        P_S · KL(p̃ ‖ q̃) = Σ_{k∈S} p_k (log p_k − log q_k) − P_S (log P_S − log Q_S),

    P_S a masked sum, Q_S = q · 1_S (a matrix-vector product). With the ULD signs g_j on the unshared tokens
    (:func:`~distilkit.losses.sorted_l1.sorted_l1_and_signs`) and σ = w_uld Σ_{j∉S} g_j q_j:

        ∂/∂s_i = (w_exact P_S / Q_S − σ) q_i − w_exact p_i   (i ∈ S),
        ∂/∂s_i = (w_uld g_i − σ) q_i                          (i ∉ S).

    Passes over ``(M, V)``: a log-softmax and a clamp (``-inf`` to the most negative float) of each side, a
    gather of log p, an exp and a mask of p, its row sums, a difference and a row dot, an exp of log q, one
    matrix-vector product; for the gradient a multiply, a subtraction and a scatter-add of the unshared
    columns, which are gathered (``(M, V − K)``) and sorted. Large tensors live in the chunk loop's
    workspace (:func:`~distilkit.losses.workspace.scratch_space`), autocast off. Rows where Q_S is below
    :data:`SMALLEST_SHARED_MASS` are redone by :func:`gold_rows`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: Tensor,
        teacher: Tensor,
        columns: Columns,
        weights: tuple[float, float],
    ) -> Tensor:
        (exact_weight, uld_weight), want_grad = weights, ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        with torch.autocast(student.device.type, enabled=False):  # float32 throughout
            buffer = scratch_space()
            log_q = _log_softmax(student, buffer("log_q", student))  # (M, V_s)
            log_p = _log_softmax(teacher, buffer("log_p", teacher))  # (M, V_t)
            p_rest = log_p.index_select(-1, columns.teacher_rest).exp_()  # (M, V_t − K)
            rows = torch.zeros(len(log_q), dtype=log_q.dtype, device=log_q.device)  # (M,)
            ratio = p_shared = mass_q = None
            if columns.shared:  # q from log q in place, once the exact term has read log q
                rows, ratio, p_shared, mass_q, q = _exact(log_p, log_q, columns, exact_weight, buffer)
            else:
                q = log_q.exp_()  # (M, V_s)
            q_rest = q.index_select(-1, columns.student_rest)  # (M, V_s − K)
            uld, signs = sorted_l1_and_signs(p_rest, q_rest, signs=want_grad)
            rows += uld_weight * uld
            grad = None
            if signs is not None:
                signed = torch.mul(q_rest, signs).mul_(uld_weight)  # (M, V_s − K) w·g ⊙ q, unshared
                sigma = signed.sum(-1, keepdim=True)  # (M, 1)
                if ratio is None or p_shared is None:
                    grad = q.mul_(-sigma)  # (M, V_s), in place of q
                else:  # the ratio's term on every column, taken back from the unshared ones
                    grad = q.mul_(ratio.unsqueeze(-1) - sigma).sub_(p_shared, alpha=exact_weight)
                    signed.sub_(q_rest.mul_(ratio.unsqueeze(-1)))
                grad.index_add_(-1, columns.student_rest, signed)  # + w·g·q, unshared
            if mass_q is not None:
                rows, grad = _redo_underflow(rows, grad, mass_q, student, teacher, columns, weights)
        if grad is not None:
            ctx.save_for_backward(grad)
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_rows: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad.mul_(grad_rows.unsqueeze(-1)), None, None, None


def _log_softmax(logits: Tensor, out: Tensor) -> Tensor:
    """``log_softmax(logits)`` into ``out``, ``-inf`` clamped to the most negative float (there the
    probability is exactly 0, and 0 times a log-ratio stays 0)."""
    return torch.log_softmax(logits, -1, out=out).clamp_min_(torch.finfo(out.dtype).min)


def _exact(
    log_p: Tensor, log_q: Tensor, columns: Columns, weight: float, buffer: Scratch
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The weighted exact term per row ``(M,)``, the gradient's coefficient of q on the shared columns
    w·P_S/Q_S ``(M,)``, p on the student's columns ``(M, V_s)`` (0 where unshared), Q_S ``(M,)`` and q
    ``(M, V_s)`` (made from ``log_q`` in place)."""
    shared = columns.student_shared.to(log_q.dtype)  # (V_s,) 1 on S
    # (M, V_s): log p of each student id's pair (of teacher id 0 where unshared: masked below)
    log_p_s = torch.index_select(log_p, -1, columns.teacher_of_student, out=buffer("log_p_s", log_q))
    p_shared = torch.exp(log_p_s, out=buffer("p_shared", log_q)).mul_(shared)  # (M, V_s) p_k on S, else 0
    mass_p = p_shared.sum(-1)  # (M,) P_S
    cross = row_dots(p_shared, log_p_s.sub_(log_q))  # (M,) Σ_S p (log p − log q)
    q = log_q.exp_()  # (M, V_s)
    mass_q = q @ shared  # (M,) Q_S
    log_ratio = mass_p.log() - mass_q.clamp_min(SMALLEST_SHARED_MASS).log()  # (M,) log(P_S / Q_S)
    exact = torch.where(mass_p > 0, cross - mass_p * log_ratio, 0.0)  # P_S = 0: nothing to compare
    return weight * exact, weight * log_ratio.exp(), p_shared, mass_q, q


def _redo_underflow(
    rows: Tensor,
    grad: Tensor | None,
    mass_q: Tensor,
    student: Tensor,
    teacher: Tensor,
    columns: Columns,
    weights: tuple[float, float],
) -> tuple[Tensor, Tensor | None]:
    """``rows`` and ``grad`` with the rows whose Q_S is below :data:`SMALLEST_SHARED_MASS` redone by the plain
    formula (autograd on those rows alone); no copy when there are none."""
    redo = (mass_q < SMALLEST_SHARED_MASS).nonzero().squeeze(-1)  # (r,)
    if not len(redo):
        return rows, grad
    with torch.enable_grad():
        logits = student.index_select(0, redo).detach().requires_grad_(grad is not None)  # (r, V_s)
        again = gold_rows(logits, teacher.index_select(0, redo).detach(), columns, weights)  # (r,)
        if grad is not None:
            grad.index_copy_(0, redo, torch.autograd.grad(again.sum(), logits)[0])
    return rows.index_copy(0, redo, again.detach()), grad
