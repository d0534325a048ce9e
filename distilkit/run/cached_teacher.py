"""Training from an offline teacher cache: the cache stands in for the teacher's side of the loss.

``distilkit cache`` runs a teacher once over a recipe's blocks and stores its targets
(:mod:`distilkit.data.teacher_cache`). A module given ``teacher_cache`` loads no teacher; it holds a
:class:`CachedTeacher`, which reads the targets of each batch's blocks by the batch's ``block_index``, so
shuffling, validation, exact resume and several processes work as with a live teacher. The module adds it to
its trainer (``configure_callbacks``, as :class:`~distilkit.run.RunState`): before any step it refuses a cache
made for other data, tokenizer, block size, temperature or vocabulary, and a loss that cannot use its targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from distilkit.batch import Batch
from distilkit.data.teacher_cache import SparseTargets, TeacherCache
from distilkit.errors import ConfigError
from distilkit.losses import DistillationLoss

FIELD = "model.teacher_cache"


@dataclass(frozen=True)
class CachedChunks:
    """The cached targets at a batch's valid positions ``(N, K)``, handed out a chunk of rows at a time (a
    :class:`~distilkit.losses.chunked.TeacherChunks` source)."""

    targets: SparseTargets

    def __call__(self, rows: slice) -> SparseTargets:
        return self.targets[rows]


class CachedTeacher(Callback):
    """An offline teacher cache in place of a teacher.

    :meth:`chunks` gives the teacher's side of the loss for a batch: the targets of its blocks
    (``batch["block_index"]``), from the training blocks while the module is in train mode and from the
    validation blocks in eval mode (Lightning sets the mode for each loop; ``validate``, ``test`` and
    ``predict`` of the validation split read the validation blocks).

    As a callback (the module adds it to its trainer), it checks the cache against the run when the trainer
    sets up: the loss must be able to use the targets (:meth:`DistillationLoss.check_sparse`, which also
    compares temperatures), and the data module's :meth:`~distilkit.TextDataModule.identity` (data content,
    tokenizer, block size, split), the vocabulary and the block counts must be the cache's. A temperature
    changed during training (a curriculum stage's knobs) is refused at the next step.

    Args:
        directory: the cache directory (``distilkit cache --output_dir``).
        loss: the module's KD loss.
    """

    def __init__(self, directory: str | Path, loss: DistillationLoss) -> None:
        self.cache = TeacherCache(directory, field=FIELD)
        self.loss = loss

    @classmethod
    def open(cls, directory: str | Path | None, teacher: Any, loss: DistillationLoss) -> CachedTeacher | None:
        """The cache at ``directory`` (None when not given); refused together with a live ``teacher``."""
        if directory is None:
            return None
        if teacher is not None:
            raise ConfigError(
                FIELD,
                str(directory),
                "is given together with model.teacher (a cache replaces the teacher)",
                "set model.init_args.teacher: null to train from the cache, or drop teacher_cache",
            )
        return cls(directory, loss)

    @property
    def mode(self) -> str:
        """``"topk"`` or ``"sample"``."""
        return self.cache.mode

    # ------------------------------------------------------------------------------------------- the loss
    def chunks(self, module: L.LightningModule, batch: Batch) -> CachedChunks:
        """The cached targets of ``batch`` at its valid positions (the module's shift and mask), on the
        batch's device, for the split the module's mode names."""
        blocks = batch.get("block_index")
        if blocks is None:
            raise ConfigError(
                "data",
                "batches without block_index",
                "cannot be matched with the teacher cache's blocks",
                "train from a cache with distilkit.TextDataModule (its batches carry block_index)",
            )
        self._check_temperature()
        split = "train" if module.training else "val"
        labels: Tensor = batch["labels"]
        targets = self.cache.targets(split, blocks.cpu()).select(labels.cpu())  # (B, T, K) -> (N, K)
        return CachedChunks(targets.to(labels.device))

    # ------------------------------------------------------------------------------------------- checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before any step, a cache this run cannot use (a ConfigError naming what differs)."""
        self.loss.check_sparse(self.cache.mode, self.cache.temperature)
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
            temperature=self.loss.temperature,
            vocab_size=int(getattr(pl_module, "vocab_size")),  # noqa: B009 (the module's logit width)
        )
        datasets = getattr(data, "datasets", {})
        for split in ("train", "val"):
            if split in datasets and len(datasets[split]) != self.cache.num_blocks(split):
                raise ConfigError(
                    f"{FIELD}: {split} blocks",
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

    def _check_temperature(self) -> None:
        if not math.isclose(self.loss.temperature, self.cache.temperature, rel_tol=1e-9):
            raise ConfigError(
                "loss.temperature",
                self.loss.temperature,
                f"was changed during training (a curriculum stage's knobs?), but the teacher cache holds "
                f"targets at temperature {self.cache.temperature}",
                "a cache holds one temperature: drop temperature from the stage's knobs, or train from a "
                "cache made at that temperature",
            )
