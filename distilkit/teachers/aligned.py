"""A teacher with another tokenizer than the student's: run on its own tokens of the same text, its
predictions handed out where they can be compared with the student's.

Every batch of student blocks is read by the teacher's tokenizer (:class:`~distilkit.data.teacher_view.
CrossTokenizerAligner`: the text rebuilt from the student's tokens, so both see the same characters), the
teacher runs on its own ids, and each student position is paired with the teacher position that predicts from
the same text, or skipped (:mod:`distilkit.data.alignment`). Per chunk of the loss the teacher's ``(m, V_t)``
logits at the compared rows are formed through its head (:class:`~distilkit.losses.aligned.AlignedLogits`),
so only a loss that compares two vocabularies is accepted (``ULDLoss``, ``GOLDLoss``; GOLD is bound to the
tokens both vocabularies share). The student's cross-entropy covers all its tokens; KD is the mean over the
compared positions, and their share is logged as ``compared_share``. In evaluation the teacher's own
perplexity and bits per byte (``val/teacher_ppl``, ``val/teacher_bpb``) come from its own next tokens.

A batch that already carries the teacher's fields (``teacher_input_ids``, ``teacher_attention_mask``,
``teacher_index``: :class:`~distilkit.data.teacher_view.AlignedCollate` in a data loader) is not aligned
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from distilkit.batch import Batch
from distilkit.data.teacher_view import CrossTokenizerAligner
from distilkit.data.token_bytes import token_byte_lengths
from distilkit.data.tokenizer import check_same_vocabulary, tokenizer_hash
from distilkit.data.vocabulary import VocabularyMap, shared_vocabulary
from distilkit.errors import ConfigError
from distilkit.losses import DistillationLoss
from distilkit.losses.aligned import AlignedLogits
from distilkit.models.heads import OutputHead, body_features, check_head, output_head
from distilkit.models.loading import vocab_rows
from distilkit.teachers.base import Split, TeacherSource
from distilkit.teachers.live import model_identity

#: The batch fields the teacher reads (made by :class:`~distilkit.data.teacher_view.AlignedCollate`, or here).
FIELDS = ("teacher_input_ids", "teacher_attention_mask", "teacher_index")
LOSS_FIELD = "model.init_args.loss"
CROSS_LOSSES = "distilkit.losses.GOLDLoss or distilkit.losses.ULDLoss"


def _no_hidden() -> ConfigError:
    return ConfigError(
        "model.hidden_loss",
        "a teacher with another tokenizer",
        "pairs no hidden states with the student's (its tokens are at other positions)",
        "drop hidden_loss",
    )


def _no_chat() -> ConfigError:
    return ConfigError(
        "data",
        "packed conversations",
        "cannot be read by a teacher with another tokenizer yet (their positions restart within a row)",
        "train on plain text, or give the data the teacher's tokenizer",
    )


@dataclass(frozen=True)
class AlignedChunks:
    """The teacher at a batch's N kept student positions, a chunk of rows at a time.

    Attributes:
        features: ``(M, H_t)`` the teacher's final hidden states at the compared positions, in row order.
        compared: ``(N,)`` bool, which kept positions are compared.
        ends: ``(N,)`` on the CPU: compared positions up to and including each row (where a chunk's rows
            start and end in ``features``).
        scale: 0-dim, N / M.
        head: the teacher's output head.
        own: evaluation only: the teacher's final hidden states at its own predicting positions ``(N_t,
            H_t)``, their next tokens ``(N_t,)`` and those tokens' byte lengths ``(N_t,)``; else None.
    """

    features: Tensor
    compared: Tensor
    ends: Tensor
    scale: Tensor
    head: OutputHead
    own: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self, rows: slice, out: Tensor | None = None) -> AlignedLogits:
        """The teacher's logits at the compared rows among ``rows`` (``out`` is not used: another width)."""
        first = int(self.ends[rows.start - 1]) if rows.start > 0 else 0
        last = int(self.ends[rows.stop - 1]) if rows.stop > 0 else 0
        with torch.no_grad():
            logits = self.head(self.features[first:last])  # (m, V_t)
            own_nll, own_bytes = self._own(rows)
        return AlignedLogits(logits, self.compared[rows], self.scale, own_nll, own_bytes)

    def _own(self, rows: slice) -> tuple[Tensor | None, Tensor | None]:
        """The teacher's NLL of its own next tokens at its share of positions for ``rows``: teacher rows
        ``[start·N_t/N, stop·N_t/N)``, so the chunks cover each teacher position once."""
        if self.own is None:
            return None, None
        features, targets, lengths = self.own
        total, count = self.compared.numel(), targets.numel()
        span = slice(rows.start * count // total, rows.stop * count // total) if total else slice(0, count)
        nll = F.cross_entropy(self.head(features[span]).float(), targets[span], reduction="none")  # (k,)
        return nll, lengths[span]


@dataclass(frozen=True)
class AlignedTeaching:
    """A teacher with another tokenizer on one batch.

    Attributes:
        last: ``(B, T_t, H_t)`` the teacher's final hidden states on its own ids.
        index: ``(B, T-1)`` for each student position the teacher position compared with it, or -1.
        head: the teacher's output head.
        own: evaluation only: the teacher's ids ``(B, T_t)``, its attention mask ``(B, T_t)`` and the byte
            length of each of its tokens ``(V_t,)``; else None.
    """

    last: Tensor
    index: Tensor
    head: OutputHead
    own: tuple[Tensor, Tensor, Tensor] | None = None
    hidden_states: None = None

    def at(self, keep: Tensor) -> AlignedChunks:
        """The teaching at the student positions ``keep`` ``(B, T-1)``: N rows, M of them compared."""
        batch, length, width = self.last.shape
        rows = torch.arange(batch, device=keep.device).unsqueeze(1).expand_as(keep)[keep]  # (N,)
        where = self.index[keep]  # (N,) teacher position, or -1
        compared = where >= 0  # (N,)
        flat = (rows * length + where.clamp_min(0))[compared]  # (M,) rows of (B·T_t, H_t)
        features = self.last.reshape(-1, width).index_select(0, flat)  # (M, H_t)
        scale = compared.numel() / compared.sum().clamp_min(1)  # N / M
        own = None
        if self.own is not None:
            ids, mask, lengths = self.own
            predicting = mask[:, :-1].bool() & mask[:, 1:].bool()  # (B, T_t - 1)
            targets = ids[:, 1:][predicting]  # (N_t,)
            own = (self.last[:, :-1][predicting], targets, lengths[targets])
        return AlignedChunks(features, compared, compared.cumsum(0).cpu(), scale, self.head, own)


class AlignedTeacher(TeacherSource):
    """A frozen teacher model whose tokenizer is not the data's (see the module docstring).

    Bound to the data's tokenizer before use: :meth:`check_run` does it when the trainer sets up (or call
    :meth:`bind`). Only losses with ``cross_vocabulary`` are accepted; a loss with ``bind`` (GOLD) gets the
    shared vocabulary.

    Args:
        model: the teacher (frozen here: ``requires_grad_(False)``, eval mode).
        tokenizer: the teacher's own tokenizer (fast).
        spec: what the model was loaded from, for its identity.
        field: the config field it came from.
    """

    full_distribution = False  # its distributions are over another vocabulary than the student's labels
    logged_terms = ("compared_share",)
    own_bytes: Tensor

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        spec: Any = None,
        field: str = "model.teacher",
    ) -> None:
        super().__init__()
        self.teacher = model.requires_grad_(False).eval()
        self.tokenizer, self.spec, self.field = tokenizer, spec, field
        self.vocab_size = len(tokenizer)
        rows = vocab_rows(model)
        if rows < self.vocab_size:
            raise ConfigError(
                field,
                f"a head of {rows} rows",
                f"is smaller than its tokenizer's {self.vocab_size} tokens",
                "give the teacher's own tokenizer (model.init_args.teacher_tokenizer)",
            )
        lengths = torch.as_tensor(token_byte_lengths(tokenizer)[: self.vocab_size], dtype=torch.long)
        self.register_buffer("own_bytes", lengths, persistent=False)
        config = getattr(model, "config", None)
        self.context: int | None = getattr(config, "max_position_embeddings", None)
        self.aligner: CrossTokenizerAligner | None = None
        self.mapping: VocabularyMap | None = None
        self._identity: dict[str, Any] | None = None

    @property
    def model(self) -> nn.Module:
        return self.teacher

    def head(self) -> OutputHead:
        """The teacher's output head over its own vocabulary, read fresh."""
        return output_head(self.teacher, self.vocab_size)

    def bind(self, student_tokenizer: PreTrainedTokenizerBase, loss: DistillationLoss | None = None) -> None:
        """Align with ``student_tokenizer`` (the data's) from now on, and give ``loss`` the shared vocabulary
        when it takes one (``bind``)."""
        self.aligner = CrossTokenizerAligner(student_tokenizer, self.tokenizer, max_length=self.context)
        self.mapping = shared_vocabulary(student_tokenizer, self.tokenizer)
        binder = getattr(loss, "bind", None)
        if callable(binder):
            binder(self.mapping)
        self._identity = None

    def teach(self, batch: Batch, split: Split, hidden: bool = False) -> AlignedTeaching:
        if hidden:
            raise _no_hidden()
        if batch.get("position_ids") is not None:
            raise _no_chat()
        ids, mask, index = self.teacher_fields(batch)
        with torch.no_grad():
            last = body_features(self.teacher, ids, mask).last  # (B, T_t, H_t)
        own = (ids, mask, self.own_bytes) if split == "val" else None
        return AlignedTeaching(last, index, self.head(), own)

    def teacher_fields(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's ids ``(B, T_t)``, attention mask ``(B, T_t)`` and the student-to-teacher index
        ``(B, T-1)``: the batch's own (aligned in the data loader) or aligned here, on the batch's device."""
        if all(batch.get(name) is not None for name in FIELDS):
            return batch["teacher_input_ids"], batch["teacher_attention_mask"], batch["teacher_index"]
        if self.aligner is None:
            raise ConfigError(
                self.field,
                "a teacher with another tokenizer",
                "is not bound to the data's tokenizer",
                "train with a data module that has a tokenizer (TextDataModule), or call bind(tokenizer)",
            )
        fields = self.aligner(batch["input_ids"], batch.get("attention_mask")).fields()
        device = batch["input_ids"].device
        return tuple(fields[name].to(device, non_blocking=True) for name in FIELDS)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------ checks
    def check_loss(self, loss: DistillationLoss, differences: str = "") -> None:
        """Refuse a loss that compares one vocabulary (the teacher's logits are over its own)."""
        if not loss.cross_vocabulary:
            raise ConfigError(
                LOSS_FIELD,
                type(loss).__name__,
                "compares distributions over one vocabulary, but data.tokenizer is not the teacher's"
                + (f" ({differences})" if differences else ""),
                f"use a cross-tokenizer loss ({CROSS_LOSSES}), or train on the teacher's tokenizer "
                "(data.tokenizer: the teacher's directory)",
            )

    def check_head(self) -> None:
        check_head(self.teacher, self.head(), self.field)

    def check_run(self, trainer: Any, module: Any, stage: str) -> None:
        """Refuse a loss that compares one vocabulary, a hidden-state loss and chat data; bind to the data's
        tokenizer."""
        data = getattr(trainer, "datamodule", None)
        tokenizer = getattr(data, "tokenizer", None)
        self.check_loss(module.loss, "" if tokenizer is None else vocabulary_differences(self, tokenizer))
        if getattr(module, "hidden_loss", None) is not None:
            raise _no_hidden()
        if getattr(data, "chat", False):
            raise _no_chat()
        if tokenizer is not None:
            self.bind(tokenizer, module.loss)
        elif self.aligner is None:
            self.teacher_fields({})  # refuses: nothing to align with

    def identity(self) -> dict[str, Any]:
        """``kind``, the model's identity (:func:`~distilkit.teachers.model_identity`), both tokenizers'
        content hashes and the shared vocabulary's fingerprint (once bound)."""
        if self._identity is None:
            student = None if self.aligner is None else tokenizer_hash(self.aligner.student_tokenizer)
            self._identity = {
                "kind": "aligned",
                **model_identity(self.spec, self.teacher),
                "teacher_tokenizer": tokenizer_hash(self.tokenizer),
                "student_tokenizer": student,
                "vocabulary_map": None if self.mapping is None else self.mapping.fingerprint(),
            }
        return self._identity


def vocabulary_differences(teacher: AlignedTeacher, tokenizer: PreTrainedTokenizerBase) -> str:
    """How the data's tokenizer differs from the teacher's, in words (empty when they have one vocabulary)."""
    try:
        check_same_vocabulary(teacher.tokenizer, teacher.field, tokenizer, "data.tokenizer")
    except ConfigError as err:
        return f"{err.value} {err.problem}"
    return ""
