"""The tokens two vocabularies share: the mapping a cross-vocabulary loss compares exactly (GOLD).

Two tokens are the same when they stand for the same text: their strings are compared as the UTF-8 bytes
they spell (:mod:`distilkit.data.token_bytes`), so the byte-level ``Ġthe``, the SentencePiece ``▁the`` and a
plain `` the`` are one token, and a byte-fallback ``<0x0A>`` is the newline. Special tokens are paired by
role (EOS with EOS, ...). The mapping is one-to-one: where one vocabulary spells the same bytes twice (a
SentencePiece piece and its byte-fallback token), the ordinary piece is kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from distilkit.data.teacher_view import special_token_map
from distilkit.data.token_bytes import TokenBytes, token_bytes


@dataclass(frozen=True)
class VocabularyMap:
    """Pairs of ids, one from each vocabulary, that stand for the same token.

    Attributes:
        student_ids: ``(K,)`` int64, student ids of the shared tokens.
        teacher_ids: ``(K,)`` int64, the teacher's ids of the same tokens, in the same order.
        student_size: V_s, the student's vocabulary size (the shared ids are below it).
        teacher_size: V_t, the same for the teacher.
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_size: int
    teacher_size: int

    def __post_init__(self) -> None:
        if self.student_ids.shape != self.teacher_ids.shape or self.student_ids.dim() != 1:
            raise ValueError(
                f"student_ids {tuple(self.student_ids.shape)} and teacher_ids "
                f"{tuple(self.teacher_ids.shape)} must be two 1-D tensors of the same length"
            )
        for name, ids, size in (
            ("student", self.student_ids, self.student_size),
            ("teacher", self.teacher_ids, self.teacher_size),
        ):
            if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < size):
                raise ValueError(f"{name}_ids must lie in [0, {size})")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"{name}_ids must not repeat an id (the mapping is one-to-one)")

    @property
    def shared(self) -> int:
        """K, the number of shared tokens."""
        return int(self.student_ids.numel())

    def fingerprint(self) -> str:
        """SHA-256 of the pairs and sizes (what a cache or checkpoint compares)."""
        digest = hashlib.sha256(f"{self.student_size},{self.teacher_size};".encode())
        digest.update(self.student_ids.numpy().astype("<i8").tobytes())
        digest.update(self.teacher_ids.numpy().astype("<i8").tobytes())
        return digest.hexdigest()


def shared_vocabulary(
    student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase
) -> VocabularyMap:
    """The tokens the two (fast) tokenizers share, compared by the bytes they stand for.

    Returns:
        :class:`VocabularyMap`, pairs in the student's id order; sizes are ``len(tokenizer)``.
    """
    student, teacher = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    theirs = _by_bytes(teacher)
    pairs = {index: theirs[piece] for piece, index in _by_bytes(student).items() if piece in theirs}
    pairs.update(special_token_map(student_tokenizer, teacher_tokenizer, student, teacher))
    student_ids = np.array(sorted(pairs), dtype=np.int64)
    teacher_ids = np.array([pairs[index] for index in student_ids.tolist()], dtype=np.int64)
    return VocabularyMap(
        torch.from_numpy(student_ids),
        torch.from_numpy(teacher_ids),
        max(len(student_tokenizer), len(student)),
        max(len(teacher_tokenizer), len(teacher)),
    )


def _by_bytes(table: TokenBytes) -> dict[bytes, int]:
    """``{bytes: id}`` of the tokens that stand for text; of two ids with the same bytes, the ordinary piece
    (not byte fallback), then the lower id."""
    order = np.lexsort((np.arange(len(table)), table.byte_fallback))  # ordinary pieces first, then by id
    found: dict[bytes, int] = {}
    for index in order.tolist():
        piece = table.pieces[index]
        if piece and piece not in found:
            found[piece] = index
    return found
