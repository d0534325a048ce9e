"""A batch of student blocks as a teacher with another tokenizer sees it, and how their predictions pair up.

:class:`CrossTokenizerAligner` aligns a batch of student blocks by :mod:`distilkit.data.alignment`'s rule:
it rebuilds each block's text from the student's tokens (so the teacher sees exactly the characters the
student sees, a character cut by the block's edge left out), tokenizes it with the teacher's tokenizer and
returns the teacher's input ids and, for every student position, the teacher position it is compared with.

It runs where batches are made: :class:`AlignedCollate` is a data loader's ``collate_fn`` that adds the
teacher's fields to every batch, so that loader workers align while the model trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate
from transformers import PreTrainedTokenizerBase

from distilkit.data.alignment import align_next_token, byte_ends, utf8_edges
from distilkit.data.token_bytes import TokenBytes, token_bytes
from distilkit.data.tokenizer import tokenizer_hash

#: Roles whose special tokens are matched between the two tokenizers, in order of preference.
SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


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
        predicting: ``(B, T - 1)`` bool: the student positions that predict a token (t and t + 1 are
            tokens, not padding): each is compared or skipped.
    """

    input_ids: Tensor
    attention_mask: Tensor
    index: Tensor
    exact: Tensor
    predicting: Tensor

    @property
    def compared(self) -> int:
        """Student positions compared with a teacher prediction."""
        return int((self.index >= 0).sum())

    @property
    def skipped(self) -> int:
        """Student positions that predict a token but are compared with none."""
        return int((self.predicting & (self.index < 0)).sum())

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
        encodings = (
            self.teacher_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            if texts
            else {"input_ids": [], "offset_mapping": []}
        )
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

    def _view(
        self, rows: list[tuple[list[int], list[int]]], student_ends: np.ndarray, valid: np.ndarray
    ) -> TeacherView:
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
            torch.from_numpy(teacher_ids),
            torch.from_numpy(mask),
            torch.from_numpy(index),
            torch.from_numpy(exact),
            torch.from_numpy(valid[:, :-1] & valid[:, 1:]),
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


class AlignedCollate:
    """A ``collate_fn`` that adds the teacher's fields (:meth:`TeacherView.fields`) to each batch of blocks.

    Args:
        aligner: the student's and the teacher's tokenizers, as a :class:`CrossTokenizerAligner`.
    """

    def __init__(self, aligner: CrossTokenizerAligner) -> None:
        self.aligner = aligner

    def __call__(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
        batch = default_collate(list(items))
        return {**batch, **self.aligner(batch["input_ids"], batch.get("attention_mask")).fields()}
