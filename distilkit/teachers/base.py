"""The teacher's side of a loss: one protocol for every kind of teacher.

A training step needs, at the N positions its loss keeps, what the teacher says: its ``(n, V)`` logits (a live
model, a mixture of models) or a few entries of its distribution (:class:`SparseTargets`: a teacher cache, a
served teacher), handed out a chunk of rows at a time so that no ``(N, V)`` tensor is held whole. A
:class:`TeacherSource` provides that for any batch, in two steps:

1. :meth:`TeacherSource.teach` runs the teacher on a batch (or reads what it said) and returns the batch's
   :class:`Teaching` (its hidden states too, where a hidden-state loss wants them);
2. :meth:`Teaching.at` narrows it to the kept positions: a :data:`TeacherChunks` callable the chunked loss
   calls once per chunk of rows.

A source also says what it can feed (:attr:`TeacherSource.targets`: dense logits or a kind of sparse
targets, at a fixed :attr:`TeacherSource.temperature` or any), so a loss it cannot feed is refused before the
first step (:meth:`TeacherSource.check_loss`), and it checks itself against the run when the trainer sets up
(:meth:`TeacherSource.check_run`: tokenizer identity, a cache's data identity). The losses and the chunk loop
see targets, never teacher types; the modules see only this protocol. A teaching may also carry ``logged``,
``{name: scalar}`` values the module logs beside its loss terms (several teachers: the share of positions that
learn from their labels alone).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

from torch import Tensor, nn

from distilkit.batch import Batch
from distilkit.errors import ConfigError
from distilkit.losses import DistillationLoss
from distilkit.losses.chunked import TeacherChunks

#: What a source hands out per chunk: ``"logits"`` ``(n, V)``, or sparse targets of a mode.
TargetKind = Literal["logits", "topk", "sample"]

#: Which data a batch comes from: the training split, or the held-out one (validation, test, predict).
Split = Literal["train", "val"]


class Teaching(Protocol):
    """What a teacher says about one batch, before it is narrowed to the positions a loss keeps."""

    @property
    def hidden_states(self) -> tuple[Tensor, ...] | None:
        """Per layer ``(B, T, H_t)`` (index 0 the embeddings), when asked for and the teacher has them."""
        ...

    def at(self, keep: Tensor) -> TeacherChunks:
        """The teaching at the positions ``keep`` ``(B, T-1)`` (position t predicts token t + 1): N rows."""
        ...


class TeacherSource(nn.Module):
    """Base of the teacher sources: a module (so its models move with the student's and stay out of the
    optimizer and checkpoints) that teaches batches.

    Subclasses set :attr:`targets`, :attr:`full_distribution`, :attr:`vocab_size` and implement :meth:`teach`;
    they override :meth:`check_run` and :meth:`identity` where they have something to check or record.

    Attributes:
        targets: what :meth:`Teaching.at` hands out per chunk.
        full_distribution: whether the chunks determine the teacher's whole distribution (the validation
            metrics that need it, ``val/teacher_ppl`` and ``val/kl``, are logged only then).
        temperature: the temperature its targets were made at, when fixed (a cache); None when any works.
        vocab_size: the logit width it speaks.
        field: the config field it came from, named in errors (``model.teacher``).
        logged_terms: terms its chunks add to the logged ones, at weight 0 (a teacher with another
            tokenizer: ``compared_share``; see :func:`distilkit.losses.aligned.teacher_terms`).
    """

    targets: TargetKind = "logits"
    full_distribution: bool = True
    logged_terms: tuple[str, ...] = ()
    temperature: float | None = None
    vocab_size: int
    field: str = "model.teacher"
    #: Settings of this source a curriculum stage may change between steps (several teachers' ``mix.NAME``).
    knobs: tuple[str, ...] = ()
    #: What the data must carry for each token (``batch["domain"]``, :mod:`distilkit.data.domains`): a row
    #: field, or ``file``; None for nothing.
    domains: str | None = None

    def teach(self, batch: Batch, split: Split, hidden: bool = False) -> Teaching:
        """The teaching of ``batch`` (from the ``split`` its blocks come from); its hidden states too when
        ``hidden`` (a source without them refuses)."""
        raise NotImplementedError

    @property
    def model(self) -> nn.Module | None:
        """The one teacher model this source runs, if it runs one (a live teacher); else None."""
        return None

    def check_loss(self, loss: DistillationLoss) -> None:
        """Refuse, with a ConfigError, a loss this source cannot feed (called when the module is built)."""
        if self.targets != "logits":
            loss.check_sparse(self.targets, self.temperature)

    def check_head(self) -> None:
        """Refuse a teacher model whose logits its chunked head would not reproduce (sources that run one)."""

    def check_knobs(self, loss: DistillationLoss) -> None:
        """Refuse a temperature changed away from the one this source's targets hold (a curriculum stage may
        change knobs between steps: checked at each batch)."""
        fixed = self.temperature
        if fixed is not None and not math.isclose(loss.temperature, fixed, rel_tol=1e-9):
            raise ConfigError(
                "loss.temperature",
                loss.temperature,
                f"is not the temperature {fixed} at which {self.field} holds its targets (a curriculum "
                "stage's knobs?)",
                "drop temperature from the stage's knobs, or use targets made at that temperature",
            )

    def set_knob(self, name: str, value: float) -> bool:
        """Set one of :attr:`knobs` (validated where it lands); False when ``name`` is not one."""
        return False

    def knob_hint(self, unknown: Iterable[str]) -> str:
        """Why knobs ``unknown`` that look like this source's are not here (empty: no hint)."""
        return ""

    def knob_state(self) -> Any:
        """What :attr:`knobs` are set to now, for :meth:`load_knob_state` (a source with knobs says)."""
        if self.knobs:
            raise NotImplementedError(f"{type(self).__name__} has knobs {self.knobs}: define knob_state")
        return None

    def load_knob_state(self, state: Any) -> None:
        """Put back what :meth:`knob_state` returned."""

    def check_run(self, trainer: Any, module: Any, stage: str) -> None:
        """Refuse, before any step, a run this source cannot teach: a loss it cannot feed (here), another
        tokenizer, other data ... (a subclass's additions). ``module``: the distillation module (its ``loss``
        and ``vocab_size``)."""
        self.check_loss(module.loss)

    def identity(self) -> dict[str, Any]:
        """What this teacher is, as a checkpoint records it (so a resume can tell another teacher)."""
        return {"kind": type(self).__name__}

    def callbacks(self) -> list[Any]:
        """Lightning callbacks this source needs in the run (a served teacher's look-ahead); none here."""
        return []

    def train(self, mode: bool = True) -> TeacherSource:
        """A teacher stays in eval mode whatever the module's mode."""
        return super().train(False)


#: Entries of an identity that say where a teacher is, not what it is (a moved teacher is the same one; so is
#: a served model reached at another URL: its name, tokenizer and K are checked at the server).
_WHERE = ("directory", "name", "url")


def same_teacher(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two identities (:meth:`TeacherSource.identity`, None for no teacher) are the same teacher:
    equal once where they lie (``directory``, ``name``) is left out, at any depth."""
    return _what(a) == _what(b)


def _what(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _what(v) for k, v in value.items() if k not in _WHERE}
    return value


def describe_teacher(identity: Mapping[str, Any] | None) -> str:
    """One line naming a teacher from its identity: ``recipes/teacher (weights sha256 1a2b3c4d5e6f)``,
    ``teacher cache runs/c (sample, S = 12, temperature 1.0) of recipes/teacher (...)``, ``none``."""
    if identity is None:
        return "none (plain language-model training)"
    kind = identity.get("kind")
    if kind == "cache":
        targets = dict(identity.get("targets") or {})
        mode = targets.get("mode")
        entries = f"K = {targets.get('top_k')}" if mode == "topk" else f"S = {targets.get('samples')}"
        made = f"{mode}, {entries}, temperature {targets.get('temperature')}"
        teacher = describe_teacher(identity.get("teacher"))
        return f"teacher cache {identity.get('directory')} ({made}) of {teacher}"
    weights = str(identity.get("weights_sha256") or "")
    name = str(identity.get("name") or kind or "a teacher")
    if name.startswith("{"):  # a config mapping: random weights
        model_type = json.loads(name).get("model_type", "model") if _is_json(name) else "model"
        name = f"a random-init {model_type} config mapping"
    dtype = identity.get("dtype")
    details = ([str(dtype)] if dtype and dtype != "float32" else []) + (
        [f"weights sha256 {weights[:12]}"] if weights else []
    )
    return f"{name} ({', '.join(details)})" if details else name


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
