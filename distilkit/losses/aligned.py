"""Targets from a teacher that reads the text with another tokenizer: its logits where its prediction and the
student's can be compared (cross-tokenizer distillation).

A teacher with another tokenizer predicts its next token from the same text as the student at some of the
student's positions only (:mod:`distilkit.data.alignment`: where both tokenizations cut the text at the same
byte). At those *compared* positions it hands out its ``(m, V_t)`` logits over its own vocabulary, which a
loss with :attr:`~distilkit.losses.DistillationLoss.cross_vocabulary` (ULD, GOLD) compares with the student's
``(m, V_s)``; the student's cross-entropy still covers every position.

**Normalisation.** Of a batch's N positions M are compared. The KD term is the mean over the M compared
positions, KD = Σ_compared d_i / M, whatever chunks they fall in: the chunk loop weighs a chunk of n rows by
n / N, so a chunk's KD is (Σ_{its compared} d_i / n) · (N / M) (:attr:`AlignedLogits.scale` is N / M).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class AlignedLogits:
    """A teacher's logits at the compared rows of one chunk of n student positions.

    Attributes:
        logits: ``(m, V_t)`` the teacher's logits at the chunk's compared rows, in row order.
        compared: ``(n,)`` bool, which rows of the chunk are compared (m of them).
        scale: 0-dim, N / M: the batch's positions over its compared positions (N / 1 when none is).
        own_nll: ``(k,)`` or None: the teacher's NLL of its own next tokens at a share of the batch's
            teacher positions (evaluation only; every teacher position falls in exactly one chunk), from
            which ``val/teacher_ppl`` and ``val/teacher_bpb`` are computed.
        own_bytes: ``(k,)`` the UTF-8 length of those next tokens (0 for special tokens), with ``own_nll``.
    """

    logits: Tensor
    compared: Tensor
    scale: Tensor
    own_nll: Tensor | None = None
    own_bytes: Tensor | None = None

    def share(self) -> Tensor:
        """The chunk's compared share m / n (0 for an empty chunk), a 0-dim float32 tensor: the chunk loop's
        n / N weight makes the batch's sum M / N (logged as ``compared_share``)."""
        return self.compared.float().mean().nan_to_num(0.0)


def teacher_terms(teacher: object) -> dict[str, Tensor]:
    """Terms a chunk's teacher side adds to the logged ones (weight 0): ``compared_share`` for
    :class:`AlignedLogits`, none for other targets."""
    return {"compared_share": teacher.share()} if isinstance(teacher, AlignedLogits) else {}
