"""Several teachers as one teacher source: domain experts routed by the data, or mixed.

``model.init_args.teachers: {NAME: spec, ...}`` names teachers, each given as ``teacher:`` takes one (a model
directory, a GGUF file, a config mapping, a module) or ``{cache: DIR}`` (a ``distilkit cache`` directory), or,
in Python, any :class:`~distilkit.teachers.base.TeacherSource`. :class:`SeveralTeachers` combines them in one
of two ways:

- **routing** (``route_by: FIELD``, the default with ``FIELD = teacher``): every document is taught by the
  teacher its row names in ``FIELD`` (``route_by: file``: by the data file it came from). The data carries
  each token's document's domain through packing (``batch["domain"]``, :mod:`distilkit.data.domains`), and
  the position that predicts token t + 1 is taught by the teacher of token t + 1's document. A teacher runs
  only on the rows of a batch that hold its positions, and only when there are some. Rows naming no teacher
  are refused before the first step, naming the first such row, or with ``unrouted: labels`` learn from
  their labels alone (:class:`~distilkit.losses.partial.PartialTargets`), counted when the run starts and
  logged as ``labels_only_share``.
- **mixing** (``mix: {NAME: weight, ...}``): every position learns from the weighted mixture of the teachers'
  distributions, ``m = Σ_j w_j · softmax(z_j) / Σ_j w_j``, handed to the loss as ``log m`` (log-space, as the
  cohort's :class:`~distilkit.teachers.mixture.PeerMixture`; a loss's temperature T then takes
  ``softmax(log m / T)``). The weights are knobs a curriculum stage may change (``mix.NAME``); a teacher of
  weight 0 is not run. With ``mix_by: posterior`` the weights are a prior, updated at every position by how
  likely each teacher finds the token that follows: ``π_j(t) = w_j p_j(y_t) / Σ_k w_k p_k(y_t)``, and
  ``m_t = Σ_j π_j(t) · softmax(z_j)`` (the posterior that teacher j wrote ``y_t``; confidence-weighted
  teachers, related to CA-MKD). Each token then learns mostly from the teacher that knows it best (a code
  example in prose from the code teacher), where fixed weights blur the two everywhere. Validation scores
  the student against the prior mixture: the posterior reads the label it teaches, so its perplexity (and
  the student's agreement with it) would flatter the teachers.

Teachers the run never needs (no domain of the data names them; weight 0 when training starts) are kept off
the device, on the CPU, and moved there the first time a batch needs them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from distilkit.batch import Batch, next_token_targets
from distilkit.data.sources import FILE_DOMAIN
from distilkit.errors import ConfigError
from distilkit.losses import DistillationLoss
from distilkit.models.loading import check_context, load_causal_lm, parse_dtype, shared_vocab_size
from distilkit.teachers.base import Split, TeacherSource
from distilkit.teachers.cache import CachedTeacher
from distilkit.teachers.live import LiveTeacher
from distilkit.teachers.teachings import FIELD, LABELS_ONLY, NOT_PREDICTED, MixedTeaching, RoutedTeaching

#: What a position whose document names no teacher does: refused before the first step, or trained on its
#: label alone.
Unrouted = Literal["error", "labels"]

#: How a mixture weighs its teachers at a position: by ``mix``'s weights, or by their posterior given the
#: token that follows (the weights as the prior).
MixBy = Literal["weights", "posterior"]

#: ``route_by`` when ``teachers`` is given with neither ``route_by`` nor ``mix``.
DEFAULT_ROUTE_FIELD = "teacher"


class SeveralTeachers(TeacherSource):
    """Several teacher sources as one, routed by the data or mixed (see the module docstring).

    Args:
        teachers: the teachers by name (at least one); all speak one vocabulary and hand out one kind of
            targets (live teachers, or teacher caches of one mode).
        route_by: the row field (or ``file``) whose value names each document's teacher; None with ``mix``.
        mix: a weight for every teacher, each >= 0, some > 0; None to route.
        unrouted: routing only: ``error`` (rows naming no teacher are refused) or ``labels`` (they learn from
            their labels alone).
        mix_by: mixing only: ``weights`` (every position by ``mix``) or ``posterior`` (``mix`` as the prior,
            updated by each teacher's probability of the position's next token).
    """

    def __init__(
        self,
        teachers: Mapping[str, TeacherSource],
        route_by: str | None = None,
        mix: Mapping[str, float] | None = None,
        unrouted: Unrouted = "error",
        mix_by: MixBy = "weights",
    ) -> None:
        super().__init__()
        members = dict(teachers)
        _check_names(members)
        if route_by is not None and mix is not None:
            raise ConfigError(
                "model.route_by", route_by, "is given together with model.mix", "route or mix, not both"
            )
        if unrouted not in ("error", "labels"):
            raise ConfigError("model.unrouted", unrouted, "is not error or labels", "use error or labels")
        if mix is not None and unrouted != "error":
            raise ConfigError(
                "model.unrouted", unrouted,
                "is for routing: with model.mix every position learns from the mixture",
                "drop model.unrouted, or route (model.route_by) instead of mixing",
            )  # fmt: skip
        if mix_by not in ("weights", "posterior"):
            raise ConfigError(
                "model.mix_by", mix_by, "is not weights or posterior", "use weights or posterior"
            )
        if mix is None and mix_by != "weights":
            raise ConfigError(
                "model.mix_by", mix_by, "is for mixing: routed positions learn from one teacher each",
                "give model.mix (the prior weights), or drop model.mix_by",
            )  # fmt: skip
        if mix is None and not (route_by is None or (isinstance(route_by, str) and route_by)):
            raise ConfigError("model.route_by", route_by, "is not a field name", "name a row field, or file")
        self.names = tuple(members)
        self.route_by = None if mix is not None else (route_by or DEFAULT_ROUTE_FIELD)
        self.domains = self.route_by or FILE_DOMAIN  # mixed: by data file, for val/<domain>/ppl
        self.unrouted, self.mix_by = unrouted, mix_by
        self.weights = None if mix is None else _mix_weights(mix, self.names)
        self.knobs = () if mix is None else tuple(f"mix.{name}" for name in self.names)
        self.members = nn.ModuleDict({str(i): member for i, member in enumerate(members.values())})
        self._parked: dict[str, TeacherSource] = {}  # not registered: stays on the CPU until needed
        self._routes: Tensor | None = None  # (domains,) teacher index of each domain id, -1: labels only
        self.targets, self.temperature, self.vocab_size = _common_kind(members, mixing=mix is not None)
        self.full_distribution = all(member.full_distribution for member in members.values())
        self.field = FIELD

    # --------------------------------------------------------------------------------------------- members
    def teacher(self, index: int, device: torch.device | None = None) -> TeacherSource:
        """Teacher ``index`` (in :attr:`names` order), moved to ``device`` first if it was kept off it."""
        key = str(index)
        if key in self.members:
            return self.members[key]  # type: ignore[return-value]
        member = self._parked[key]
        if device is not None:
            member.to(device)
        return member

    def all_teachers(self) -> list[TeacherSource]:
        return [self.teacher(index) for index in range(len(self.names))]

    @property
    def model(self) -> None:
        """Several models: none is *the* teacher model (a cut student or a hidden-state loss needs one)."""
        return None

    # -------------------------------------------------------------------------------------------- teaching
    def teach(self, batch: Batch, split: Split, hidden: bool = False) -> RoutedTeaching | MixedTeaching:
        if hidden:
            raise ConfigError(
                "model.hidden_loss",
                "several teachers",
                "needs one teacher's hidden states",
                "drop hidden_loss",
            )
        if self.weights is not None:
            return self._mixed(batch, split)
        return self._routed(batch, split)

    def _routed(self, batch: Batch, split: Split) -> RoutedTeaching:
        """Each teacher on the rows of ``batch`` that hold positions it teaches."""
        domain = batch.get("domain")
        if domain is None or self._routes is None:
            raise ConfigError(
                "data",
                "batches without domain" if domain is None else "a run that was not set up",
                f"cannot be routed by {self.route_by}",
                "train with distilkit.TextDataModule in a Lightning Trainer (it carries what route_by names)",
            )
        keep, _ = next_token_targets(batch["labels"])  # (B, T-1)
        target = domain[:, 1:].cpu()  # (B, T-1): the domain of the token each position predicts
        route = torch.where(target >= 0, self._routes[target.clamp_min(0)], LABELS_ONLY)  # (B, T-1)
        route = torch.where(keep.cpu(), route, NOT_PREDICTED)
        if self.unrouted == "error" and bool((route == LABELS_ONLY).any()):
            raise ConfigError(
                "data", "a batch", f"has tokens whose {self.route_by} names no teacher", "fix the data"
            )
        device = batch["input_ids"].device
        taught = {}
        for index in range(len(self.names)):
            rows = (route == index).any(1)  # (B,)
            if bool(rows.any()):
                teacher = self.teacher(index, device)
                part = batch if bool(rows.all()) else _rows(batch, rows.to(device))
                taught[index] = (rows, teacher.teach(part, split))
        return RoutedTeaching(route, taught, self.unrouted == "labels", device)

    def _mixed(self, batch: Batch, split: Split) -> MixedTeaching:
        """Every teacher of positive weight on the whole batch."""
        assert self.weights is not None
        self._check_weights()
        active = [(index, weight) for index, weight in enumerate(self.weights) if weight > 0]
        device = batch["input_ids"].device
        teachings = [self.teacher(index, device).teach(batch, split) for index, _ in active]
        posterior = self.mix_by == "posterior" and split == "train"  # validation: the fair prior mixture
        labels = batch["labels"][:, 1:] if posterior else None  # (B, T-1)
        return MixedTeaching(tuple(teachings), tuple(weight for _, weight in active), labels)

    # -------------------------------------------------------------------------------------------- knobs
    def set_knob(self, name: str, value: float) -> bool:
        """``mix.NAME``: teacher NAME's weight in the mixture (>= 0; normalised when used)."""
        if name not in self.knobs or self.weights is None:
            return False
        index = self.names.index(name.removeprefix("mix."))
        self.weights = list(self.weights)
        self.weights[index] = _weight(f"model.mix.{self.names[index]}", value)
        return True

    def knob_hint(self, unknown: Iterable[str]) -> str:
        """Routed: ``mix.NAME`` knobs are a mixture's, so a stage of a routed run cannot set them."""
        if self.weights is None and any(name.startswith("mix.") for name in unknown):
            return "mix.NAME knobs exist only when the teachers are mixed (model.mix, not model.route_by)"
        return ""

    # ------------------------------------------------------------------------------------------- checks
    def check_loss(self, loss: DistillationLoss) -> None:
        super().check_loss(loss)
        for teacher in self.all_teachers():
            teacher.check_loss(loss)

    def check_head(self) -> None:
        for teacher in self.all_teachers():
            teacher.check_head()

    def knob_state(self) -> list[float] | None:
        return None if self.weights is None else list(self.weights)

    def load_knob_state(self, state: list[float] | None) -> None:
        self.weights = None if state is None else list(state)

    def check_knobs(self, loss: DistillationLoss) -> None:
        """Each teacher's check, and a mixture's weights not all 0 (a stage sets them one knob at a time)."""
        for teacher in self.all_teachers():
            teacher.check_knobs(loss)
        self._check_weights()

    def _check_weights(self) -> None:
        if self.weights is not None and not any(self.weights):
            raise ConfigError(
                "model.mix", dict(zip(self.names, self.weights, strict=True)), "are all 0",
                "give a teacher a positive weight (a curriculum stage's mix.NAME knobs?)",
            )  # fmt: skip

    def check_run(self, trainer: Any, module: Any, stage: str) -> None:
        """Every teacher checks itself against the run (tokenizer, cache identity); routing: the data must
        carry ``route_by`` and every domain must name a teacher (or train on its labels, ``unrouted:
        labels``). Teachers the run will not need are then kept off the device."""
        self.check_loss(module.loss)
        for teacher in self.all_teachers():
            teacher.check_run(trainer, module, stage)
        if self.weights is not None:
            self._keep_on_device({index for index, weight in enumerate(self.weights) if weight > 0})
            return
        data: Any = getattr(trainer, "datamodule", None)
        self._routes = self._route_table(data)
        self._keep_on_device({int(index) for index in self._routes if index >= 0})

    def _route_table(self, data: Any) -> Tensor:
        """``(domains,)`` the teacher index of each domain id of ``data`` (-1: labels only)."""
        field = getattr(data, "domain_field", None)
        if field != self.route_by:
            raise ConfigError(
                "data.domains",
                field,
                f"is not what model.route_by names ({self.route_by}): batches must carry each token's "
                f"{self.route_by}",
                "leave data.domains out (the data then carries what the model routes by), or make them "
                "equal; route with distilkit.TextDataModule",
            )
        names: list[str | None] = list(data.domain_names)
        table = [self.names.index(name) if name in self.names else LABELS_ONLY for name in names]
        unknown = [name for name, index in zip(names, table, strict=True) if index == LABELS_ONLY]
        if unknown and self.unrouted == "error":
            name = unknown[0]
            where = data.document_domains.row(name)
            raise ConfigError(
                f"{where}: {self.route_by}",
                name,
                "is missing: the row names no teacher"
                if name is None
                else f"names no teacher of model.teachers {list(self.names)}",
                "name one of them in every row, add a teacher of that name, or set "
                "model.init_args.unrouted: labels to train such rows on their labels alone",
            )
        if unknown:
            self._say_labels_only(data, unknown)
        return torch.tensor(table, dtype=torch.long)

    def _say_labels_only(self, data: Any, unknown: list[str | None]) -> None:
        """One line: how many tokens of each split learn from their labels alone, and why."""
        domains, blocks = getattr(data, "document_domains", None), getattr(data, "datasets", {})
        counts = []
        for split in ("train", "val"):
            tokens = domains.tokens(blocks[split]) if domains is not None and split in blocks else {}
            alone = sum(tokens.get(name, 0) for name in unknown)
            counts.append(f"{alone:,} of {sum(tokens.values()):,} {split} tokens")
        rank_zero_info(
            f"model.unrouted=labels: {' and '.join(counts)} learn from their labels alone (their "
            f"{self.route_by} {unknown} names no teacher of {list(self.names)}); logged as labels_only_share"
        )

    def _keep_on_device(self, needed: set[int]) -> None:
        """Register the ``needed`` teachers (they move with the module); keep the others off the device."""
        for key in list(self.members):
            if int(key) not in needed:
                self._parked[key] = self.members.pop(key)  # type: ignore[assignment]
        for key in list(self._parked):
            if int(key) in needed:
                self.members[key] = self._parked.pop(key)

    def identity(self) -> dict[str, Any]:
        """The teachers' identities by name, and how they are combined."""
        combined: dict[str, Any] = {"route_by": self.route_by, "unrouted": self.unrouted}
        if self.weights is not None:
            combined = {"mix": dict(zip(self.names, self.weights, strict=True))}
            combined |= {"mix_by": self.mix_by} if self.mix_by != "weights" else {}  # older runs resume
        teachers = {name: self.teacher(i).identity() for i, name in enumerate(self.names)}
        return {"kind": "several", **combined, "teachers": teachers}


# ---------------------------------------------------------------------------------------------- opening
@dataclass(frozen=True)
class TeacherLoader:
    """Loads a teacher model of ``model.teachers`` as ``model.teacher`` is loaded: frozen, in eval mode, in
    ``teacher_dtype``, config mappings filled from the tokenizer, and checked to share the student's
    vocabulary (the logit width ``vocab_size`` the losses compare) and to hold ``block_size`` positions."""

    student: nn.Module
    vocab_size: int
    teacher_dtype: str = "float32"
    tokenizer_size: int | None = None
    block_size: int | None = None
    eos_token_id: int | None = None

    def __call__(self, spec: Any, field: str) -> nn.Module:
        defaults = {"vocab_size": self.tokenizer_size, "max_position_embeddings": self.block_size}
        defaults |= {"bos_token_id": self.eos_token_id, "eos_token_id": self.eos_token_id}
        dtype = parse_dtype("model.teacher_dtype", self.teacher_dtype)
        model = load_causal_lm(spec, field=field, dtype=dtype, defaults=defaults)
        model.requires_grad_(False).eval()
        check_context(field, model, self.block_size)
        try:
            width = shared_vocab_size(self.student, model, self.tokenizer_size)
        except ConfigError as err:
            raise ConfigError(field, err.value, err.problem, err.fix) from err
        if width != self.vocab_size:
            raise ConfigError(
                field, f"{width} logits", f"differs from the student's {self.vocab_size}",
                "give every teacher the student's tokenizer and vocabulary",
            )  # fmt: skip
        return model


def open_several(
    teachers: Mapping[str, Any],
    vocab_size: int,
    load: Callable[[Any, str], nn.Module],
    route_by: str | None = None,
    mix: Mapping[str, float] | None = None,
    unrouted: Unrouted = "error",
    mix_by: MixBy = "weights",
) -> SeveralTeachers:
    """The :class:`SeveralTeachers` that ``model.teachers`` and ``route_by``, ``mix``, ``unrouted`` describe.

    Args:
        teachers: ``{name: spec}``; a spec is a model as ``model.teacher`` takes one (loaded by ``load``),
            ``{cache: DIR}``, or a :class:`TeacherSource`.
        vocab_size: the logit width the losses compare.
        load: ``(spec, field) -> model``, e.g. a :class:`TeacherLoader`.
        route_by / mix / unrouted / mix_by: as :class:`SeveralTeachers` takes them.
    """
    if not isinstance(teachers, Mapping) or not teachers:
        raise ConfigError(
            FIELD, teachers, "is not a mapping of names to teachers", "give {NAME: teacher, ...}"
        )
    members: dict[str, TeacherSource] = {}
    for name, spec in teachers.items():
        field = f"{FIELD}.{name}"
        if isinstance(spec, TeacherSource):
            members[name] = spec
        elif isinstance(spec, Mapping) and set(spec) == {"cache"}:
            members[name] = CachedTeacher(spec["cache"], field=field)
        elif spec is None:
            raise ConfigError(
                field, None, "is not a teacher", "give a model directory, a config or {cache: DIR}"
            )
        else:
            members[name] = LiveTeacher(load(spec, field), vocab_size, spec=spec, field=field)
    return SeveralTeachers(members, route_by=route_by, mix=mix, unrouted=unrouted, mix_by=mix_by)


# -------------------------------------------------------------------------------------------------- helpers
def _check_names(members: Mapping[Any, TeacherSource]) -> None:
    if not members:
        raise ConfigError(FIELD, {}, "names no teacher", "give {NAME: teacher, ...}")
    for name, member in members.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(FIELD, name, "is not a teacher name", "use a non-empty name without dots")
        if not isinstance(member, TeacherSource):
            raise ConfigError(f"{FIELD}.{name}", type(member).__name__, "is not a teacher source", "open it")


def _weight(field: str, value: Any) -> float:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
    if not ok:
        raise ConfigError(field, value, "is not a weight (a finite number >= 0)", "use e.g. 0.5")
    return float(value)


def _mix_weights(mix: Mapping[str, float], names: Sequence[str]) -> list[float]:
    """One weight per teacher in ``names`` order: every teacher given one, each >= 0, some > 0."""
    if not isinstance(mix, Mapping):
        raise ConfigError("model.mix", mix, "is not a mapping of teacher names to weights", "give {NAME: w}")
    for name in mix:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            fix = f"use {close[0]!r}" if close else f"use one of {list(names)}"
            raise ConfigError(f"model.mix.{name}", mix[name], f"names no teacher of {list(names)}", fix)
    weights = {name: _weight(f"model.mix.{name}", weight) for name, weight in mix.items()}
    if sum(weights.values()) <= 0:
        raise ConfigError("model.mix", dict(mix), "gives no teacher a positive weight", "raise one")
    missing = [name for name in names if name not in mix]
    if missing:
        raise ConfigError(
            "model.mix", dict(mix), f"gives no weight to {missing} of model.teachers",
            f"give every teacher one ({missing[0]}: 0 runs it only once a curriculum stage's "
            f"mix.{missing[0]} raises it), or drop it from model.teachers",
        )  # fmt: skip
    return [weights[name] for name in names]


def _common_kind(members: Mapping[str, TeacherSource], mixing: bool) -> tuple[Any, float | None, int]:
    """``(targets, temperature, vocab_size)`` the teachers share; several kinds, temperatures or widths are
    refused, as are sparse targets in a mixture."""
    items = list(members.items())
    first_name, first = items[0]
    for name, member in items:
        field = f"{FIELD}.{name}"
        if mixing and member.targets != "logits":
            raise ConfigError(
                field, member.targets, "hands out sparse targets (a teacher cache), which cannot be mixed",
                "mix live teachers, or route caches (route_by)",
            )  # fmt: skip
        if member.targets != first.targets:
            raise ConfigError(
                field, member.targets, f"targets differ from {FIELD}.{first_name}'s ({first.targets})",
                "route teachers of one kind: all live, or caches of one mode",
            )  # fmt: skip
        if member.vocab_size != first.vocab_size:
            raise ConfigError(
                field, member.vocab_size, f"differs from {FIELD}.{first_name}'s ({first.vocab_size})",
                "give every teacher one vocabulary",
            )  # fmt: skip
        if member.temperature != first.temperature:
            raise ConfigError(
                field, member.temperature, f"differs from {FIELD}.{first_name}'s temperature",
                "make every cache at one temperature",
            )  # fmt: skip
    return first.targets, first.temperature, first.vocab_size


def _rows(batch: Batch, rows: Tensor) -> dict[str, Tensor]:
    """The ``rows`` (``(B,)`` bool) of every per-row field of ``batch``."""
    size = batch["input_ids"].shape[0]
    return {
        name: value[rows]
        for name, value in batch.items()
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == size
    }
