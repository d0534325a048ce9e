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

:class:`CrossTokenizerAligner` does this for a batch of student blocks: it rebuilds each block's text from
the student's tokens (so the teacher sees exactly the characters the student sees, a character cut by the
block's edge left out), tokenizes it with the teacher's tokenizer and returns the teacher's input ids and,
for every student position, the teacher position it is compared with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from distilkit.data.token_bytes import TokenBytes, token_bytes
from distilkit.data.tokenizer import tokenizer_hash

#: Roles whose special tokens are matched between the two tokenizers, in order of preference.
SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


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
    for i in np.flatnonzero(starts[1:] < ends[:-1])[::-1]:  # token i overlaps token i + 1: rare, walked backwards
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


@dataclass(frozen=True)
class Segment:
    """A piece of a block: a run of text starting at unit ``start`` (``text``: what decodes of it, after
    ``lead`` bytes of a character cut by the block's start), or (``text`` None) the special token
    ``student_id`` that occupies unit ``start``."""

    start: int
    text: str | None
    student_id: int = -1
    lead: int = 0


@dataclass(frozen=True)
class TeacherView:
    """A batch of student blocks as the teacher sees them, and how their predictions pair up.

    Attributes:
        input_ids: ``(B, T_t)`` the teacher's token ids of each block's text, right-padded.
        attention_mask: ``(B, T_t)`` 1 on the teacher's tokens, 0 on padding.
        index: ``(B, T - 1)`` int64: for student position t of block b (predicting token t + 1, the layout
            of :func:`distilkit.batch.next_token_targets`), the teacher position of block b whose
            prediction it is compared with, or -1 (skipped).
        exact: ``(B, T - 1)`` bool: compared, and both next tokens cover the same text.
    """

    input_ids: Tensor
    attention_mask: Tensor
    index: Tensor
    exact: Tensor

    @property
    def compared(self) -> int:
        """Student positions compared with a teacher prediction."""
        return int((self.index >= 0).sum())

    def fields(self) -> dict[str, Tensor]:
        """The batch fields a teacher source reads: ``teacher_input_ids``, ``teacher_attention_mask``,
        ``teacher_index``."""
        return {
            "teacher_input_ids": self.input_ids,
            "teacher_attention_mask": self.attention_mask,
            "teacher_index": self.index,
        }


class CrossTokenizerAligner:
    """Turns batches of student blocks into the teacher's inputs and a position alignment.

    Each block's text is rebuilt from the student's token bytes, a character cut by the block's edges left
    out, and split at special tokens. Text goes to the teacher's tokenizer (no special tokens added); a
    student special token with a teacher counterpart (by role: EOS, BOS, pad, unk; else by equal content)
    becomes that token; one without is left out of the teacher's view. The teacher's own prefix (the BOS
    its tokenizer adds to a text, if any) opens every block and follows every EOS. Blocks whose teacher
    tokens exceed ``max_length`` are cut there (the student positions beyond are skipped).

    Args:
        student_tokenizer: the tokenizer of the student's blocks (``data.tokenizer``).
        teacher_tokenizer: the teacher's tokenizer (fast).
        max_length: the most teacher tokens per block (the teacher's context), or None.
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
    ) -> None:
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student, self.teacher = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
        self.max_length = max_length
        self.specials = special_token_map(student_tokenizer, teacher_tokenizer, self.student, self.teacher)
        self.eos_id = student_tokenizer.eos_token_id
        self.prefix = _added_prefix(teacher_tokenizer)
        pad = teacher_tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else teacher_tokenizer.eos_token_id or 0)
        widths = self.student.lengths.copy()  # (V_s,) units each student token covers
        widths[list(self.specials)] = 1
        self.widths = widths

    def identity(self) -> dict[str, str]:
        """What the alignment depends on: both tokenizers' content hashes."""
        return {
            "student_tokenizer": tokenizer_hash(self.student_tokenizer),
            "teacher_tokenizer": tokenizer_hash(self.teacher_tokenizer),
        }

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TeacherView:
        """Align a batch.

        Args:
            input_ids: ``(B, T)`` student token ids.
            attention_mask: ``(B, T)`` 1 on tokens, 0 on padding (default: all tokens).

        Returns:
            :class:`TeacherView`.
        """
        ids = input_ids.cpu().numpy()  # (B, T)
        valid = np.ones_like(ids, dtype=bool) if attention_mask is None else attention_mask.cpu().numpy() > 0
        student_ends = np.cumsum(self.widths[ids] * valid, axis=1)  # (B, T) units
        segments = [self._segments(ids[b], valid[b], student_ends[b]) for b in range(len(ids))]
        texts = [segment.text for block in segments for segment in block if segment.text is not None]
        encodings = self.teacher_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        teacher = iter(zip(texts, encodings["input_ids"], encodings["offset_mapping"], strict=True))
        rows = [self._teacher_row(block, teacher) for block in segments]
        return self._view(rows, student_ends, valid)

    # ------------------------------------------------------------------------------------------- internals
    def _segments(self, ids: np.ndarray, valid: np.ndarray, ends: np.ndarray) -> list[Segment]:
        """One block as runs of text and the special tokens between them, in order."""
        tokens = np.flatnonzero(valid)  # (L,) positions of the block's tokens
        cuts = np.flatnonzero(self.student.lengths[ids[tokens]] == 0).tolist()  # special tokens: no text
        out: list[Segment] = []
        first = 0
        for cut in [*cuts, len(tokens)]:
            run = tokens[first:cut]  # positions of one run of text
            if len(run):
                data = b"".join([self.student.pieces[i] for i in ids[run].tolist()])  # type: ignore[misc]
                lead, tail = utf8_edges(data)
                start = int(ends[run[0]] - self.widths[ids[run[0]]])
                out.append(Segment(start, data[lead : len(data) - tail].decode("utf-8"), lead=lead))
            if cut < len(tokens) and int(ids[tokens[cut]]) in self.specials:
                out.append(Segment(int(ends[tokens[cut]]) - 1, None, int(ids[tokens[cut]])))
            first = cut + 1
        return out

    def _teacher_row(self, block: list[Segment], encodings: Iterator[tuple]) -> tuple[list[int], list[int]]:
        """The teacher's ids and the unit where each ends, for one block."""
        ids: list[int] = []
        ends: list[int] = []
        opens_document = True  # the teacher's prefix goes before the block's text and the text after an EOS
        for segment in block:
            if opens_document and segment.text is not None:
                ids.extend(self.prefix)
                ends.extend([segment.start] * len(self.prefix))
            if segment.text is None:
                ids.append(self.specials[segment.student_id])
                ends.append(segment.start + 1)
                opens_document = segment.student_id == self.eos_id
                continue
            opens_document = False
            text, token_ids, offsets = next(encodings)
            ids.extend(token_ids)
            where = segment.start + segment.lead  # a character cut by the block's start is left out
            ends.extend((where + byte_ends(text, token_ids, np.asarray(offsets), self.teacher)).tolist())
        if self.max_length is not None:
            ids, ends = ids[: self.max_length], ends[: self.max_length]
        return ids, ends

    def _view(self, rows: list[tuple[list[int], list[int]]], student_ends: np.ndarray, valid: np.ndarray) -> TeacherView:
        batch, length = len(rows), max(1, max(len(ids) for ids, _ in rows))
        teacher_ids = np.full((batch, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, length), dtype=np.int64)
        index = np.full((batch, student_ends.shape[1] - 1), -1, dtype=np.int64)
        exact = np.zeros(index.shape, dtype=bool)
        for b, (ids, ends) in enumerate(rows):
            teacher_ids[b, : len(ids)], mask[b, : len(ids)] = ids, 1
            aligned = align_next_token(student_ends[b], np.asarray(ends, dtype=np.int64), valid[b])
            index[b], exact[b] = aligned.index, aligned.exact
        return TeacherView(
            torch.from_numpy(teacher_ids), torch.from_numpy(mask), torch.from_numpy(index), torch.from_numpy(exact)
        )


def special_token_map(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    student_bytes: TokenBytes | None = None,
    teacher_bytes: TokenBytes | None = None,
) -> dict[int, int]:
    """``{student special id: teacher special id}``: paired by role (EOS, BOS, pad, unk, in that order of
    preference), then by equal content. Ids that stand for text on either side are not paired."""
    student_bytes = student_bytes or token_bytes(student)
    teacher_bytes = teacher_bytes or token_bytes(teacher)

    def special(table: TokenBytes, index: int | None) -> bool:
        return index is not None and 0 <= index < len(table) and table.pieces[index] is None

    candidates = [(getattr(student, role, None), getattr(teacher, role, None)) for role in SPECIAL_ROLES]
    teacher_vocab = teacher.get_vocab()
    candidates += [(index, teacher_vocab.get(token)) for token, index in sorted(student.get_vocab().items())]
    pairs: dict[int, int] = {}
    for mine, theirs in candidates:  # one-to-one: the first pair that uses an id wins
        usable = special(student_bytes, mine) and special(teacher_bytes, theirs)
        if usable and mine not in pairs and theirs not in pairs.values():
            pairs[int(mine)] = int(theirs)  # type: ignore[arg-type]
    return pairs


def _added_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before a text when it adds special tokens (a BOS), found by encoding one."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []
