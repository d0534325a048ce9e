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

import torch
from torch import Tensor

from distilkit.batch import IGNORE_INDEX
from distilkit.data.vocabulary import VocabularyMap
from distilkit.errors import ConfigError, check_range
from distilkit.losses.base import DistillationLoss
from distilkit.losses.gold_rows import Columns, GOLDRows, gold_rows
from distilkit.losses.sorted_l1 import sorted_l1_fast


class ULDLoss(DistillationLoss):
    """Universal Logit Distillation: the L1 distance between the sorted probability vectors,

        ULD(p, q) = Σ_i |p_(i) − q_(i)|,   p_(1) ≥ p_(2) ≥ ..., q_(1) ≥ q_(2) ≥ ...,

    p = softmax(t/T) over the teacher's V_t tokens, q = softmax(s/T) over the student's V_s, the shorter
    vector padded with zeros (Boizard et al. 2024; it is their Wasserstein-1 distance with unit cost
    between different tokens). It lies in [0, 2], is 0 when the sorted vectors agree, and needs no mapping
    between the vocabularies.

    Cost per chunk of n positions: a softmax of each side, a sort of each side (values for the teacher,
    values and order for the student; n·V·log V, the largest part on a CPU, rows split over torch's
    threads), one pass for the differences and a scatter of their signs (the gradient with respect to q,
    kept as int8); backward: the softmax's (two passes) and one multiply. A step at n = 2,048, V = 4,096
    costs about 2x a same-tokenizer KD step on 2 CPU cores (``benchmarks/cross_tokenizer.py``); on a GPU
    ``torch.sort`` is fast.

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
    with a JSD; here the exact part is the forward KL, made a divergence by the renormalisation.

    Cost per chunk of n positions (the gradient is formed in the forward pass, in the student's own column
    order, :class:`~distilkit.losses.gold_rows.GOLDRows`): a log-softmax of each side, a gather of the
    teacher's log-probabilities into the student's columns, about six in-place passes over ``(n, V_s)``, and
    a sort of each side's V − K unshared columns; backward: one multiply. A step at n = 2,048, V_s = 4,096
    (K = 3,201 shared) costs about 1.3x a same-tokenizer KD step on 2 CPU cores
    (``benchmarks/cross_tokenizer.py``).

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
        self._columns: dict[tuple[int, int, torch.device], Columns] = {}

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
        columns = self.columns(student_logits.shape[-1], teacher_logits.shape[-1], student_logits.device)
        weights = (self.exact_weight, self.uld_weight)
        if torch.compiler.is_compiling():  # let the compiler fuse the plain formula and its gradient
            return gold_rows(student_logits, teacher_logits.detach(), columns, weights)
        return GOLDRows.apply(student_logits, teacher_logits.detach(), columns, weights)

    def columns(self, student_size: int, teacher_size: int, device: torch.device) -> Columns:
        """The mapping as :class:`Columns` on ``device`` for logits of these vocabulary sizes (at least the
        mapping's: a model's head may have more rows than its tokenizer has tokens; those are unshared)."""
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
            self._columns[key] = Columns.of(mapping, student_size, teacher_size).to(device)
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
