"""``student: {from_teacher: {...}}``: a student cut from the loaded teacher before training.

The mapping gives the student's sizes in the teacher's own config field names (any left out keep the
teacher's value) plus three options; the surgery itself is :func:`~distilkit.models.pruning.cut_from_teacher`:

.. code-block:: yaml

    student:
      from_teacher:
        n_layer: 2                 # gpt2 names; llama/qwen2: num_hidden_layers, hidden_size, ...
        n_embd: 128
        n_head: 4
        layers: [0, 2]             # keep these teacher blocks; left out: rank blocks on calibration data
        layer_ranking: influence   # or loss: how blocks are ranked (pruning.importance explains both)
        importance: activation     # or magnitude: how heads, MLP channels and hidden channels are ranked
        calibration_batches: 8     # the first N batches of the run's training data (default 8)

A cut needs data when it ranks blocks (no ``layers``) or ranks width by activation. That data is the run's
training data, which exists only once the trainer has set the data module up; so the model built at load
time is then a provisional cut of the same shapes (the first blocks, magnitude importance), and
:meth:`StudentCut.finish_for` replaces it with the real cut in the module's ``setup``. A checkpoint loaded
afterwards (a resumed fit, ``load_from_checkpoint``) replaces the weights either way, and
:meth:`StudentCut.restored` rebuilds the model to the checkpoint's stored config if it differs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from distilkit.errors import ConfigError
from distilkit.models.pruning import PruneReport, cut_from_teacher
from distilkit.models.pruning.cut import IMPORTANCES, LAYER_RANKINGS, Importance, LayerRanking
from distilkit.models.pruning.layouts import layout_for

KEY = "from_teacher"
OPTIONS = ("layers", "layer_ranking", "importance", "calibration_batches")
DEFAULT_CALIBRATION_BATCHES = 8
#: Config entries that may differ between a provisional cut and a checkpoint of the same student.
_VOLATILE = {"dtype", "torch_dtype", "_name_or_path", "transformers_version", "architectures"}

Batch = dict[str, Tensor]


@dataclasses.dataclass
class StudentCut:
    """A parsed ``from_teacher`` spec and the state of its cut.

    Attributes:
        targets: sizes by the teacher's config field names.
        layers: teacher blocks to keep, or None to rank them on calibration data.
        layer_ranking: how blocks are ranked: ``"influence"`` or ``"loss"``.
        importance: ``"activation"`` or ``"magnitude"``.
        calibration_batches: how many batches of the run's training data to measure importance on.
        field: the config field of the spec, named in errors.
        pending: the model built so far is provisional; the real cut waits for calibration data.
        report: what the last cut kept (None before the real cut).
    """

    targets: dict[str, Any]
    layers: list[int] | None = None
    layer_ranking: LayerRanking = "influence"
    importance: Importance = "activation"
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES
    field: str = f"model.student.{KEY}"
    pending: bool = False
    report: PruneReport | None = None

    @classmethod
    def parse(cls, spec: Any, field: str = "model.student") -> StudentCut | None:
        """The cut a ``{from_teacher: {...}}`` spec asks for; None for any other model spec.

        Raises:
            ConfigError: other keys beside ``from_teacher``, a body that is not a mapping, a bad
                ``importance`` or ``calibration_batches`` (sizes and ``layers`` are checked by the cut).
        """
        if isinstance(spec, StudentCut):
            return spec
        if not isinstance(spec, Mapping) or KEY not in spec:
            return None
        if len(spec) != 1:
            others = sorted(str(k) for k in spec if k != KEY)
            raise ConfigError(
                field, dict(spec), f"mixes {KEY} with {others}", f"put the sizes inside {KEY}: {{...}}"
            )
        body, where = spec[KEY], f"{field}.{KEY}"
        if not isinstance(body, Mapping):
            raise ConfigError(where, body, "must be a mapping of sizes", "e.g. {n_layer: 2, n_embd: 128}")
        importance = body.get("importance", "activation")
        if importance not in IMPORTANCES:
            raise ConfigError(
                f"{where}.importance", importance, "is not a known importance", f"use one of {IMPORTANCES}"
            )
        ranking = body.get("layer_ranking", "influence")
        if ranking not in LAYER_RANKINGS:
            raise ConfigError(
                f"{where}.layer_ranking", ranking, "is not a known ranking", f"use one of {LAYER_RANKINGS}"
            )
        count = body.get("calibration_batches", DEFAULT_CALIBRATION_BATCHES)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"{where}.calibration_batches", count, "must be an integer >= 0", "give e.g. 8")
        layers: Any = body.get("layers")
        return cls(
            targets={k: v for k, v in body.items() if k not in OPTIONS},
            layers=list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else layers,
            layer_ranking=ranking,
            importance=importance,
            calibration_batches=count,
            field=where,
        )

    # ------------------------------------------------------------------------------------------- cutting
    def build(self, teacher: Any) -> nn.Module:
        """The student (float32, train mode) as far as it can be cut without data.

        Every size, ``layers`` and data requirement is checked here, before any training. When the cut
        needs calibration data, the model returned is provisional (same shapes) and :attr:`pending` is set.
        """
        if teacher is None:
            raise ConfigError(
                self.field, self.targets, "cuts the student from the teacher, but there is no teacher",
                "set model.teacher, or give the student as a model directory or config mapping",
            )  # fmt: skip
        first = self.layers if self.layers is not None else _first_blocks(teacher, self.targets)
        model, report = cut_from_teacher(
            teacher, self.targets, layers=first, importance="magnitude", field=self.field
        )
        ranks_depth = first is not None and self.layers is None  # blocks dropped, none named
        ranks_width = self.importance == "activation" and report.width_cut
        if (ranks_depth or ranks_width) and self.calibration_batches > 0:
            self.pending = True
            return _trainable(model)
        # no data needed (or none given: then the cut below says what needs it)
        model, self.report = cut_from_teacher(
            teacher, self.targets, layers=self.layers, importance=self.importance, field=self.field,
            layer_ranking=self.layer_ranking,
        )  # fmt: skip
        return _trainable(model)

    def finish(self, teacher: Any, calibration: Iterable[Batch]) -> nn.Module:
        """The real cut, with importance measured on ``calibration`` batches (float32, train mode)."""
        batches = list(calibration)
        model, self.report = cut_from_teacher(
            teacher,
            self.targets,
            layers=self.layers,
            importance=self.importance,
            calibration=batches,
            layer_ranking=self.layer_ranking,
            field=self.field,
        )
        self.report.calibration = describe_calibration(batches)
        self.pending = False
        return _trainable(model)

    def finish_for(self, teacher: Any, trainer: Any) -> nn.Module:
        """:meth:`finish` on the first batches of ``trainer``'s training data, the same on every process
        (rank 0's are broadcast, so every process cuts the same student); the report is printed once.

        On one device or under DDP the teacher first moves where training puts it anyway (a GPU measures
        faster); a sharded teacher is measured where it is."""
        batches = calibration_data(getattr(trainer, "datamodule", None), self.calibration_batches, self.field)
        if trainer.world_size > 1:
            rank_zero_warn(
                f"{self.field}: calibrating on rank 0's share of the first {len(batches)} batches "
                f"({describe_calibration(batches)}); distilkit prune, on one process, ranks on whole "
                "batches, so its cut may differ"
            )
        if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            teacher.to(trainer.strategy.root_device)
        model = self.finish(teacher, trainer.strategy.broadcast(batches))
        assert self.report is not None
        rank_zero_info("\n".join(self.report.lines()))
        return model

    def restored(self, model: nn.Module, stored: Mapping[str, Any] | None) -> nn.Module:
        """The model a checkpoint's weights load into: ``model``, or one rebuilt to the checkpoint's stored
        config when that differs (a provisional cut may keep other blocks than the checkpoint's, which
        matters where the config lists per-layer settings). The checkpoint replaces any pending cut."""
        self.pending = False
        if not stored or _comparable(stored) == _comparable(getattr(model, "config", None)):
            return model
        fields = dict(stored)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        return _trainable(AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def describe_calibration(batches: list[Batch]) -> str:
    """``8 batches x 16 blocks x 128 tokens (16,384 tokens), the first of the training data``: what a cut
    ranked on. The same recipe with the same batch size on one process ranks on the same blocks."""
    shape = tuple(batches[0]["input_ids"].shape) if batches else (0, 0)
    tokens = sum(int(batch["input_ids"].numel()) for batch in batches)
    return (
        f"{len(batches)} batches x {shape[0]} blocks x {shape[1]} tokens ({tokens:,} tokens), "
        "the first of the training data: a different batch size ranks on other blocks"
    )


def calibration_data(datamodule: Any, count: int, field: str) -> list[Batch]:
    """The first ``count`` batches of ``datamodule``'s training loader (``input_ids`` and
    ``attention_mask``), the run's own training data in its own order.

    Raises:
        ConfigError: there is no data module, or its loader yields no batch.
    """
    if datamodule is None:
        raise ConfigError(
            f"{field}.calibration_batches",
            count,
            "the cut measures importance on the run's training data, but this run has no data module",
            "fit with a datamodule, or name the blocks (layers: [...]) and use importance: magnitude",
        )
    keys = ("input_ids", "attention_mask")
    batches = [
        {k: batch[k] for k in keys if k in batch}
        for batch in itertools.islice(datamodule.train_dataloader(), count)
    ]
    if not batches:
        raise ConfigError(
            f"{field}.calibration_batches", count, "the training data yields no batch", "give more text"
        )
    return batches


def _first_blocks(teacher: nn.Module, targets: Mapping[str, Any]) -> list[int] | None:
    """``[0, ..., n - 1]`` for a target layer count ``n`` below the teacher's (a provisional choice of
    blocks); None when the depth is not cut or the count is not valid (the cut then says why)."""
    config: Any = getattr(teacher, "config", None)
    layout = layout_for(getattr(config, "model_type", ""))
    name = None if layout is None else layout.fields["layers"]
    if name is None or layout is None:
        return None
    names = [name, *(alias for alias, real in getattr(config, "attribute_map", {}).items() if real == name)]
    count = next((targets[n] for n in names if n in targets), None)
    total = layout.sizes(config)["layers"]
    valid = isinstance(count, int) and not isinstance(count, bool) and 1 <= count < total
    return list(range(count)) if valid else None  # type: ignore[arg-type]


def _trainable(model: nn.Module) -> nn.Module:
    return model.float().requires_grad_(True).train()


def _comparable(config: Any) -> dict[str, Any]:
    values = config if isinstance(config, Mapping) else config.to_dict() if config is not None else {}
    return {k: v for k, v in values.items() if k not in _VOLATILE}
