"""Aligning two tokenizations of the same text for next-token prediction (cross-tokenizer distillation).

A student and a teacher with different tokenizers cut the same text at different places. Every token is
placed on one axis, the UTF-8 bytes of the text, by the byte where it ends; a special token that both sides
have (EOS between documents) takes one unit of its own on that axis, so that documents stay apart.

**The rule.** Student position t predicts student token t + 1, from the text before byte ``E_s[t]`` (the end
of student token t). It is compared with the teacher position u whose context is the same text, i.e. where
a teacher token ends at the same byte, ``E_t[u] == E_s[t]`` (both sides start their next token at the same
byte); when several teacher tokens end there (zero-width tokens such as a BOS), the last one, which
predicts the teacher's next token of text. Every other student position is *skipped*: the two sides have
no prediction from the same text to compare (the student's context ends inside a teacher token). A student
position whose next token covers no text (a special token the teacher has no counterpart for) is skipped
too. The two next tokens need not cover the same text (student ``" hel"``, teacher ``" hello"``): that is
what a cross-vocabulary loss (:mod:`distilkit.losses.cross_tokenizer`) compares; where they do, the pair is
counted as *exact*.

Byte ends come from the bytes each token stands for (:mod:`distilkit.data.token_bytes`), which is exact
whenever the tokens spell the text: a byte-level BPE (an emoji split over several tokens included), a
SentencePiece vocabulary with byte fallback (after the ``▁`` it prepends to a text, which covers no byte of
it and ends where the text starts). Character offsets (``return_offsets_mapping``) are not reliable for
this: GPT-2's ``trim_offsets`` cuts whitespace off both ends of a span, and every piece of a split
character gets the whole character's span; they are used, with split characters cut by the pieces' byte
lengths, only for a tokenizer whose normalizer changes the text.

:mod:`distilkit.data.teacher_view` does this for batches of student blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distilkit.data.token_bytes import TokenBytes


def char_to_byte(text: str) -> np.ndarray:
    """``(len(text) + 1,)`` int64: the UTF-8 byte offset of each character offset of ``text``."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (C,) code points
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)  # (C,)
    return np.concatenate([[0], np.cumsum(sizes)])


def byte_ends(text: str, ids: np.ndarray, offsets: np.ndarray, table: TokenBytes) -> np.ndarray:
    """The UTF-8 byte of ``text`` where each of its tokens ends.

    When the tokens spell the text (their bytes joined end with the text's bytes: a byte-level BPE, or a
    SentencePiece vocabulary after the ``▁`` it prepends), the ends are exact: the running sum of the
    tokens' byte lengths, less what was put before the text. Otherwise (a normalizer changed the text) they
    come from the offsets (:func:`ends_from_offsets`).

    Args:
        text: the text that was tokenized.
        ids: ``(L,)`` its token ids.
        offsets: ``(L, 2)`` character ``(start, end)`` of each token, as fast tokenizers give them.
        table: the bytes of the tokenizer's ids (:func:`~distilkit.data.token_bytes.token_bytes`).

    Returns:
        ``(L,)`` int64, nondecreasing.
    """
    ids = np.asarray(ids, dtype=np.int64)
    lengths = table.lengths[ids]  # (L,)
    data = text.encode("utf-8")
    spelled = b"".join([table.pieces[i] or b"" for i in ids.tolist()])
    if spelled.endswith(data):
        return np.maximum(np.cumsum(lengths) - (len(spelled) - len(data)), 0)
    return ends_from_offsets(text, offsets, lengths)


def ends_from_offsets(text: str, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Token ends from character offsets: the byte of each span's end.

    Consecutive tokens whose spans overlap (a character split over several tokens, or a prepended ``▁``
    sharing the first character's span) are cut from the right by their byte lengths: the last keeps its
    span's end, each one before ends where the next one starts. Offsets trimmed of whitespace (a
    ``ByteLevel`` post-processor's ``trim_offsets``) are taken as they are: :func:`byte_ends` uses them only
    for tokens that do not spell their text.

    Args:
        text: the text that was tokenized.
        offsets: ``(L, 2)`` character ``(start, end)`` of each token.
        lengths: ``(L,)`` the byte length of each token's piece.

    Returns:
        ``(L,)`` int64, nondecreasing.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (L, 2)
    to_byte = char_to_byte(text)
    starts, ends = to_byte[offsets[:, 0]], to_byte[offsets[:, 1]]  # (L,), (L,)
    for i in np.flatnonzero(starts[1:] < ends[:-1])[
        ::-1
    ]:  # token i overlaps token i + 1: rare, walked backwards
        ends[i] = max(starts[i], min(ends[i], ends[i + 1] - int(lengths[i + 1])))
    return np.maximum.accumulate(ends) if len(ends) else ends


@dataclass(frozen=True)
class NextTokenAlignment:
    """Which teacher prediction each student prediction is compared with.

    Attributes:
        index: ``(L_s - 1,)`` int64: for student position t (which predicts student token t + 1), the
            teacher position whose prediction it is compared with, or -1 (skipped).
        exact: ``(L_s - 1,)`` bool: compared, and both next tokens end at the same byte too.
    """

    index: np.ndarray
    exact: np.ndarray

    @property
    def compared(self) -> int:
        return int((self.index >= 0).sum())

    @property
    def skipped(self) -> int:
        return int((self.index < 0).sum())


def align_next_token(
    student_ends: np.ndarray, teacher_ends: np.ndarray, student_valid: np.ndarray | None = None
) -> NextTokenAlignment:
    """Align two tokenizations of one text by the rule of this module (see the module docstring).

    Args:
        student_ends: ``(L_s,)`` nondecreasing, where each student token ends (bytes, or units).
        teacher_ends: ``(L_t,)`` nondecreasing, the same for the teacher, on the same axis.
        student_valid: ``(L_s,)`` optional, false for student tokens that are not there (padding).

    Returns:
        :class:`NextTokenAlignment` for the ``L_s - 1`` student positions that have a next token.
    """
    student_ends = np.asarray(student_ends, dtype=np.int64)
    teacher_ends = np.asarray(teacher_ends, dtype=np.int64)
    context = student_ends[:-1]  # (L_s - 1,) where the text seen by position t ends
    u = np.searchsorted(teacher_ends, context, side="right") - 1  # last teacher token ending at or before
    found = u >= 0
    found[found] = teacher_ends[u[found]] == context[found]
    found &= student_ends[1:] > context  # the next student token covers text
    if student_valid is not None:
        valid = np.asarray(student_valid, dtype=bool)
        found &= valid[:-1] & valid[1:]
    index = np.where(found, u, -1)
    after = np.minimum(u + 1, len(teacher_ends) - 1)  # the teacher's next token (clamped; checked below)
    exact = found & (u + 1 < len(teacher_ends))
    exact[exact] = teacher_ends[after[exact]] == student_ends[1:][exact]
    return NextTokenAlignment(index=index, exact=exact)


def utf8_edges(data: bytes) -> tuple[int, int]:
    """``(lead, tail)``: bytes of a character cut off at the start (continuation bytes) and at the end (an
    incomplete sequence) of ``data``; ``data[lead:len(data) - tail]`` is what decodes."""
    lead = 0
    while lead < min(3, len(data)) and data[lead] & 0xC0 == 0x80:
        lead += 1
    for back in range(1, min(4, len(data) - lead) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for its lead byte
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        return lead, back if back < need else 0
    return lead, 0
