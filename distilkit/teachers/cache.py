"""An offline teacher cache in the teacher's place: the targets ``distilkit cache`` stored, read by block.

``distilkit cache`` runs a teacher once over a recipe's blocks and stores its targets
(:mod:`distilkit.data.teacher_cache`). :class:`CachedTeacher` reads the targets of each batch's blocks by the
batch's ``block_index`` (from the training blocks for the training split, the validation blocks otherwise), so
shuffling, validation, exact resume and several processes work as with a live teacher. Before any step it
refuses a cache made for other data, tokenizer, block size, temperature or vocabulary, and a loss that cannot
use its targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from distilkit.batch import Batch
from distilkit.data.teacher_cache import SparseTargets, TeacherCache
from distilkit.errors import ConfigError
from distilkit.teachers.base import Split, TeacherSource

FIELD = "model.teacher_cache"


@dataclass(frozen=True)
class CachedTargets:
    """The cached targets at a batch's kept positions ``(N, K)``, a chunk of rows at a time."""

    targets: SparseTargets

    def __call__(self, rows: slice, out: Tensor | None = None) -> SparseTargets:
        return self.targets[rows]


@dataclass(frozen=True)
class CachedTeaching:
    """A batch's cached targets ``(B, T, K)``: position t holds the teacher's prediction of token t + 1."""

    targets: SparseTargets
    hidden_states: None = None

    def at(self, keep: Tensor) -> CachedTargets:
        """The targets at the positions ``keep`` ``(B, T-1)``: ``(N, K)``."""
        return CachedTargets(self.targets.apply(lambda t: t[:, :-1][keep]))


class CachedTeacher(TeacherSource):
    """An offline teacher cache in place of a teacher.

    Its targets are sparse (:attr:`targets` is the cache's mode) at the cache's temperature, so only losses
    that accept them train from it (:meth:`DistillationLoss.check_sparse`), and the validation metrics that
    need the teacher's whole distribution are not logged.

    Args:
        directory: the cache directory (``distilkit cache --output_dir``).
        field: the config field it came from, named in errors.
    """

    full_distribution = False

    def __init__(self, directory: str | Path, field: str = FIELD) -> None:
        super().__init__()
        self.cache = TeacherCache(directory, field=field)
        self.field, self.targets = field, self.cache.mode  # type: ignore[assignment]  # "topk" or "sample"
        self.temperature = self.cache.temperature
        self.vocab_size = self.cache.vocab_size

    def teach(self, batch: Batch, split: Split, hidden: bool = False) -> CachedTeaching:
        """The cached targets of ``batch``'s blocks (``batch["block_index"]``), on the batch's device."""
        if hidden:
            raise ConfigError(
                "model.hidden_loss",
                "a teacher cache",
                "has no hidden states",
                "drop hidden_loss, or train live",
            )
        blocks = batch.get("block_index")
        if blocks is None:
            raise ConfigError(
                "data",
                "batches without block_index",
                "cannot be matched with the teacher cache's blocks",
                "train from a cache with distilkit.TextDataModule (its batches carry block_index)",
            )
        targets = self.cache.targets(split, blocks.cpu())  # (B, T, K)
        return CachedTeaching(targets.to(batch["input_ids"].device))

    def check_run(self, trainer: Any, module: Any, stage: str) -> None:
        """Refuse, before any step, a cache this run cannot use (a ConfigError naming what differs)."""
        super().check_run(trainer, module, stage)
        data: Any = getattr(trainer, "datamodule", None)
        identity = getattr(data, "identity", None)
        if not callable(identity):
            raise ConfigError(
                "data",
                type(data).__name__,
                "does not say what its blocks are made from (no identity())",
                "train from a teacher cache with distilkit.TextDataModule",
            )
        run_identity = identity()
        self.cache.check(
            run_identity,
            block_size=int(run_identity["block_size"]),
            temperature=module.loss.temperature,
            vocab_size=int(module.vocab_size),
        )
        datasets = getattr(data, "datasets", {})
        for split in ("train", "val"):
            if split in datasets and len(datasets[split]) != self.cache.num_blocks(split):
                raise ConfigError(
                    f"{self.field}: {split} blocks",
                    len(datasets[split]),
                    f"the cache in {self.cache.directory} holds {self.cache.num_blocks(split)}",
                    "make a cache for this run with `distilkit cache`, or point to a matching one",
                )
        own_files = {
            "test": ("data.test_files", "test_files"),
            "predict": ("data.predict_files", "predict_sources"),
        }
        if stage in own_files and datasets.get(stage) is not datasets.get("val"):  # blocks numbered apart
            field, attribute = own_files[stage]
            raise ConfigError(
                field,
                getattr(data, attribute, None),
                "are not in the teacher cache (it holds the training and validation blocks)",
                f"{stage} with --model.init_args.teacher_cache null (the student's metrics need no teacher)",
            )

    def identity(self) -> dict[str, Any]:
        """The cache's directory, its targets (mode, K or S, temperature, seed) and what it records of the
        teacher that made them and of the data: a cache rebuilt elsewhere from the same teacher with the
        same settings is the same teacher; one from another teacher, or with other targets, is not."""
        manifest = self.cache.manifest
        targets = {key: manifest[key] for key in ("mode", "top_k", "samples", "seed") if key in manifest}
        recorded = dict(self.cache.identity)
        return {
            "kind": "cache",
            "directory": str(self.cache.directory),
            "teacher": recorded.pop("teacher", None),
            "targets": {**targets, "temperature": self.cache.temperature},
            "data": recorded,
        }
