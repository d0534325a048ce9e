"""A live teacher: a frozen model run on every batch, its logits formed chunk by chunk through its head."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from distilkit.batch import Batch, model_inputs
from distilkit.models.adapters import weights_sha256
from distilkit.models.heads import OutputHead, body_features, check_head, output_head
from distilkit.models.loading import check_model_tokenizer
from distilkit.teachers.base import Split, TeacherSource


@dataclass(frozen=True)
class HeadTargets:
    """A live teacher at a batch's N kept positions: its final hidden states ``(N, H_t)`` through its head."""

    features: Tensor
    head: OutputHead

    def __call__(self, rows: slice, out: Tensor | None = None) -> Tensor:
        """The teacher's ``(n, V)`` logits at ``rows`` (in ``out``, a float32 buffer, when given)."""
        with torch.no_grad():
            return self.head.post(self.head.raw(self.features[rows], out=out))


class LiveTeaching(NamedTuple):
    """A live teacher's view of one batch.

    Attributes:
        last: ``(B, T, H_t)`` final hidden states.
        hidden_states: every layer's ``(B, T, H_t)`` when asked for, else None.
        head: the teacher's output head.
    """

    last: Tensor
    hidden_states: tuple[Tensor, ...] | None
    head: OutputHead

    def at(self, keep: Tensor) -> HeadTargets:
        """The teacher's logits at the positions ``keep`` ``(B, T-1)``, chunk by chunk."""
        return HeadTargets(self.last[:, :-1][keep], self.head)  # (N, H_t) through the head


class LiveTeacher(TeacherSource):
    """A frozen teacher model, run under ``no_grad`` in eval mode on every batch.

    Args:
        model: the teacher (frozen here: ``requires_grad_(False)``, eval mode).
        vocab_size: the logit width the losses compare (padded rows beyond it are cut off).
        spec: what it was loaded from (a directory, a config mapping, a module), for its identity and the
            tokenizer check.
        field: the config field it came from.
    """

    def __init__(
        self, model: nn.Module, vocab_size: int, spec: Any = None, field: str = "model.teacher"
    ) -> None:
        super().__init__()
        self.teacher = model.requires_grad_(False).eval()
        self.vocab_size, self.spec, self.field = vocab_size, spec, field
        self._identity: dict[str, Any] | None = None

    @property
    def model(self) -> nn.Module:
        return self.teacher

    def head(self) -> OutputHead:
        """The teacher's output head, read fresh (parameters may move or be wrapped between steps)."""
        return output_head(self.teacher, self.vocab_size)

    def teach(self, batch: Batch, split: Split, hidden: bool = False) -> LiveTeaching:
        with torch.no_grad():
            body = body_features(self.teacher, **model_inputs(batch), output_hidden_states=hidden)
        return LiveTeaching(body.last, body.hidden_states, self.head())

    def check_head(self) -> None:
        """Refuse a teacher whose logits its chunked head would not reproduce."""
        check_head(self.teacher, self.head(), self.field)

    def check_run(self, trainer: Any, module: Any, stage: str) -> None:
        """The data's tokenizer must be the one saved with the teacher, token for token."""
        super().check_run(trainer, module, stage)
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is not None:
            check_model_tokenizer(self.field, self.spec, tokenizer)
        self.identity()  # hashed now, while the teacher is whole (before any sharding), once per run

    def identity(self) -> dict[str, Any]:
        """``kind``, ``name`` (the directory or hub name, the config mapping as JSON, or the module's class),
        ``config_sha256``, ``weights_sha256`` (hashed once: the teacher is frozen) and ``dtype``."""
        if self._identity is None:
            dtype = str(next(self.teacher.parameters()).dtype).removeprefix("torch.")
            self._identity = {"kind": "live", **model_identity(self.spec, self.teacher), "dtype": dtype}
        return self._identity


def model_identity(spec: Any, model: nn.Module) -> dict[str, str]:
    """A model as caches and checkpoints record it: ``name`` (the directory or hub name, the config mapping as
    JSON, or the module's class), ``config_sha256``, a hash of its transformers config (or its ``repr``), and
    ``weights_sha256``, a hash of its weights: a teacher retrained in place is another teacher."""
    if isinstance(spec, (str, os.PathLike)):
        name = str(spec)
    elif isinstance(spec, dict):
        name = json.dumps(spec, sort_keys=True, default=str)
    else:
        name = type(model).__name__
    config: Any = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(model)
    config_hash = hashlib.sha256(text.encode()).hexdigest()
    return {"name": name, "config_sha256": config_hash, "weights_sha256": weights_sha256(model)}
