"""Losses between a student and a teacher whose vocabularies differ (cross-tokenizer distillation).

The two distributions are over different sets of tokens, so the KL of the other losses is undefined. At
the positions :mod:`distilkit.data.alignment` pairs up (both predict the next token from the same text),
these compare them without or with a mapping of the vocabularies:

- :class:`ULDLoss`, Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss for LLMs"): the Wasserstein-1 distance between the two
  distributions when any two different tokens are at distance 1, which is the L1 distance between the
  probability vectors sorted in decreasing order (the shorter padded with zeros). It needs no mapping and
  ignores which token is which: it matches the shape (confidence, spread) of the teacher's distribution.
- :class:`GOLDLoss`, the hybrid of TRL's GOLD trainer: exact KL on the tokens both vocabularies share
  (:func:`distilkit.data.vocabulary.shared_vocabulary`), the ULD distance on the rest.

Both get temperature, masking and float32 math from :class:`DistillationLoss`; the student's and the
teacher's logits have the same leading dimensions and their own vocabulary sizes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from distilkit.batch import IGNORE_INDEX
from distilkit.data.vocabulary import VocabularyMap
from distilkit.errors import ConfigError, check_range
from distilkit.losses.base import DistillationLoss, kl_from_log_probs


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Σ_i |sort↓(p)_i − sort↓(q)_i|, the shorter row padded with zeros; rows ``(M, V_p)``, ``(M, V_q)`` ->
    ``(M,)``. The plain formula (autograd through ``torch.sort``); :func:`sorted_l1_fast` computes the
    same."""
    p = p.sort(-1, descending=True).values  # (M, V_p)
    q = q.sort(-1, descending=True).values  # (M, V_q)
    common = min(p.shape[-1], q.shape[-1])
    head = (p[:, :common] - q[:, :common]).abs().sum(-1)  # (M,)
    return head + p[:, common:].sum(-1) + q[:, common:].sum(-1)  # past the shorter row: the longer's tail


def sorted_l1_fast(p: Tensor, q: Tensor) -> Tensor:
    """:func:`sorted_l1` with the gradient with respect to ``q`` formed in the forward pass (``p`` gets none).

    ∂/∂q_j = sign(q_j − p_(r)) where r is q_j's rank in q (sign(q_j) past the shorter row): one sort of each
    row (values only for ``p``, with the order for ``q``), one pass for the differences, a scatter of their
    signs, kept as int8. On the CPU the sorts are numpy's (vectorised; 2-5x faster than ``torch.sort`` here),
    elsewhere ``torch.sort``'s. Under ``torch.compile`` the plain formula is used.
    """
    if torch.compiler.is_compiling():
        return sorted_l1(p.detach(), q)
    return _SortedL1Rows.apply(q, p.detach())


class _SortedL1Rows(torch.autograd.Function):
    """``(q (M, V_q), p (M, V_p)) -> (M,)``: :func:`sorted_l1`, the gradient for q only (see
    :func:`sorted_l1_fast`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: Tensor, p: Tensor) -> Tensor:  # type: ignore[override]
        q_sorted, order = _sorted_with_order(q)  # (M, V_q) each, increasing
        p_sorted = _sorted(p)  # (M, V_p), increasing
        common = min(q.shape[-1], p.shape[-1])
        tail_q, tail_p = q.shape[-1] - common, p.shape[-1] - common  # entries that meet the zero padding
        diff = q_sorted[:, tail_q:] - p_sorted[:, tail_p:]  # (M, common): the largest entries pair up
        rows = diff.abs().sum(-1) + q_sorted[:, :tail_q].sum(-1) + p_sorted[:, :tail_p].sum(-1)  # (M,)
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            signs = torch.cat([q_sorted[:, :tail_q].sign(), diff.sign()], dim=-1).to(torch.int8)  # (M, V_q)
            ctx.save_for_backward(torch.empty_like(signs).scatter_(-1, order, signs))  # back to q's order
        return rows

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_rows: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (signs,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return signs.to(grad_rows.dtype) * grad_rows.unsqueeze(-1), None


def _sorted(rows: Tensor) -> Tensor:
    """Each row of ``(M, V)`` sorted increasingly (numpy's vectorised sort on the CPU)."""
    if rows.device.type != "cpu":
        return torch.sort(rows, dim=-1).values
    return torch.from_numpy(np.sort(rows.detach().numpy(), axis=-1))


def _sorted_with_order(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``(M, V)`` sorted increasingly, and the ``(M, V)`` int64 order that sorts it."""
    if rows.device.type != "cpu":
        values, order = torch.sort(rows, dim=-1)
        return values, order
    array = rows.detach().numpy()
    order_np = np.argsort(array, axis=-1)
    return torch.from_numpy(np.take_along_axis(array, order_np, axis=-1)), torch.from_numpy(order_np)


class ULDLoss(DistillationLoss):
    """Universal Logit Distillation: the L1 distance between the sorted probability vectors,

        ULD(p, q) = Σ_i |p_(i) − q_(i)|,   p_(1) ≥ p_(2) ≥ ..., q_(1) ≥ q_(2) ≥ ...,

    p = softmax(t/T) over the teacher's V_t tokens, q = softmax(s/T) over the student's V_s, the shorter
    vector padded with zeros (Boizard et al. 2024; it is their Wasserstein-1 distance with unit cost
    between different tokens). It lies in [0, 2], is 0 when the sorted vectors agree, and needs no mapping
    between the vocabularies. Per chunk of n positions: a softmax and a sort of each side (the sorts, of cost
    n·V·log V, dominate), one pass for the differences; the backward pass scatters their signs back through
    the student's sort and softmax.

    A teacher cache's sparse targets are refused (it needs the teacher's whole distribution).
    """

    sparse_modes: ClassVar[tuple[str, ...]] = ()
    cross_vocabulary: ClassVar[bool] = True

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        with torch.no_grad():
            p = teacher_logits.softmax(-1)  # (M, V_t)
        return sorted_l1_fast(p, student_logits.softmax(-1))


class GOLDLoss(DistillationLoss):
    """The hybrid of TRL's GOLD: exact KL on the shared tokens, ULD on the rest.

    With the shared tokens S (pairs of a teacher and a student id that stand for the same text, see
    :class:`~distilkit.data.vocabulary.VocabularyMap`), p = softmax(t/T), q = softmax(s/T), P_S = Σ_{k∈S} p_k,
    and p̃, q̃ the two distributions renormalised over S:

        GOLD = exact_weight · P_S · KL(p̃ ‖ q̃)  +  uld_weight · Σ_i |sort↓(p_rest)_i − sort↓(q_rest)_i|

    where p_rest, q_rest are the probabilities of each side's tokens outside S (not renormalised, the
    shorter padded with zeros). The first term is the part of KL(p‖q) that the shared tokens carry once the
    mass of the rest is set aside (P_S·KL(p̃‖q̃) = Σ_{k∈S} p_k·log(p̃_k/q̃_k)): it says which shared token,
    and stays finite when one side has no tokens outside S. The second is ULD (:class:`ULDLoss`) on the rest,
    and also matches the total mass outside S (it is at least |Σ p_rest − Σ q_rest|). With identical
    vocabularies (every token shared) GOLD is exactly the forward KL; with nothing shared it is ULD.

    TRL's GOLD trainer (``trl/experimental/gold``) compares the matched tokens' unnormalised probabilities
    with a JSD; this is the KL the issue names, made a divergence by the renormalisation.

    Per chunk of n positions: a log-softmax of each side (full V), gathers of the K shared columns and
    their log-softmax, and a softmax, a sort and a difference over the V − K unshared columns of each side;
    with a large overlap the sorts are short and GOLD costs about what a KL does.

    The mapping is bound before use with :meth:`bind` (a teacher with another tokenizer does it from the
    two tokenizers, :func:`~distilkit.data.vocabulary.shared_vocabulary`); it is not saved in checkpoints.

    Args:
        exact_weight: weight of the exact KL term (>= 0, default 1.0).
        uld_weight: weight of the ULD term on the unshared tokens (>= 0, default 1.0).
        temperature: as for every loss.
        ignore_index: as for every loss.
    """

    knobs = ("temperature", "exact_weight", "uld_weight")
    sparse_modes: ClassVar[tuple[str, ...]] = ()
    cross_vocabulary: ClassVar[bool] = True

    def __init__(
        self,
        exact_weight: float = 1.0,
        uld_weight: float = 1.0,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(temperature, ignore_index)
        self.exact_weight, self.uld_weight = exact_weight, uld_weight
        self.mapping: VocabularyMap | None = None
        self._columns: dict[tuple[int, int, torch.device], tuple[Tensor, ...]] = {}

    @property
    def exact_weight(self) -> float:
        return self._exact_weight

    @exact_weight.setter
    def exact_weight(self, value: float) -> None:
        self._exact_weight = float(check_range("loss.exact_weight", value, 0.0, math.inf))

    @property
    def uld_weight(self) -> float:
        return self._uld_weight

    @uld_weight.setter
    def uld_weight(self, value: float) -> None:
        self._uld_weight = float(check_range("loss.uld_weight", value, 0.0, math.inf))

    def bind(self, mapping: VocabularyMap) -> GOLDLoss:
        """Use ``mapping`` (the shared tokens of the student's and the teacher's vocabularies) from now on."""
        self.mapping, self._columns = mapping, {}
        return self

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        student_ids, teacher_ids, student_rest, teacher_rest = self.columns(
            student_logits.shape[-1], teacher_logits.shape[-1], student_logits.device
        )
        teacher_logits = teacher_logits.detach()
        log_total_p = teacher_logits.logsumexp(-1, keepdim=True)  # (M, 1)
        log_total_q = student_logits.logsumexp(-1, keepdim=True)  # (M, 1)
        exact = torch.zeros_like(log_total_p.squeeze(-1))  # (M,)
        if teacher_ids.numel():
            shared_t, shared_s = teacher_logits[:, teacher_ids], student_logits[:, student_ids]  # (M, K)
            mass = (shared_t.logsumexp(-1) - log_total_p.squeeze(-1)).exp()  # (M,) P_S
            kl = kl_from_log_probs(shared_t.log_softmax(-1), shared_s.log_softmax(-1))  # (M,) KL(p̃‖q̃)
            exact = torch.where(mass > 0, mass * kl, exact)  # P_S = 0: no shared mass, nothing to compare
        p_rest = (teacher_logits[:, teacher_rest] - log_total_p).exp()  # (M, V_t − K)
        q_rest = (student_logits[:, student_rest] - log_total_q).exp()  # (M, V_s − K)
        rest = sorted_l1_fast(p_rest, q_rest)  # (M,)
        return self.exact_weight * exact + self.uld_weight * rest

    def columns(self, student_size: int, teacher_size: int, device: torch.device) -> tuple[Tensor, ...]:
        """``(student_ids (K,), teacher_ids (K,), student_rest (V_s − K,), teacher_rest (V_t − K,))`` on
        ``device`` for logits of these vocabulary sizes (at least the mapping's: a model's head may have
        more rows than its tokenizer has tokens; those rows are unshared)."""
        key = (student_size, teacher_size, device)
        if key not in self._columns:
            mapping = self._bound()
            for side, size, expected in (
                ("student", student_size, mapping.student_size),
                ("teacher", teacher_size, mapping.teacher_size),
            ):
                if size < expected:
                    raise ValueError(
                        f"{side} logits have {size} entries, fewer than the {expected} tokens of the "
                        f"vocabulary mapping bound to {type(self).__name__}"
                    )
            self._columns[key] = tuple(
                ids.to(device)
                for ids in (
                    mapping.student_ids,
                    mapping.teacher_ids,
                    _complement(mapping.student_ids, student_size),
                    _complement(mapping.teacher_ids, teacher_size),
                )
            )
        return self._columns[key]

    def _bound(self) -> VocabularyMap:
        if self.mapping is None:
            raise ConfigError(
                "loss",
                type(self).__name__,
                "has no vocabulary mapping: it compares the tokens the two vocabularies share",
                "bind one first, loss.bind(shared_vocabulary(student_tokenizer, teacher_tokenizer)) "
                "(from distilkit.data.vocabulary); a teacher with another tokenizer binds it for you",
            )
        return self.mapping


def _complement(ids: Tensor, size: int) -> Tensor:
    """``(size − len(ids),)`` the ids in ``[0, size)`` not in ``ids``, increasing."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)
