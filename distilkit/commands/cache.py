"""``distilkit cache``: run a recipe's teacher once over its data and store its targets for later training.

    distilkit cache --config R.yaml --output_dir DIR --mode topk --top_k 64  (or --mode sample --samples 12)
    distilkit cache --config R.yaml --output_dir DIR --mode topk --top_k 32 --tail_samples 32
    distilkit fit --config R.yaml --model.init_args.teacher null --model.init_args.teacher_cache DIR

The recipe is parsed as ``distilkit fit`` parses it (``--trainer.*``, ``--data.*``, ``--model.*`` overrides
work), then a Lightning predict loop (:class:`TeacherPass`) runs the teacher over the training and validation
blocks the cache does not hold yet (an interrupted run resumes) on the trainer's devices and processes. Each
process writes its own shards (:class:`~distilkit.data.teacher_cache.CacheWriter`); once all have finished,
rank 0 merges them into ``manifest.json``, which records the teacher, the data's identity, the settings and
``bytes_per_token``. The format is described in :mod:`distilkit.data.teacher_cache.format`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from rich.console import Console
from torch.utils.data import DataLoader, Subset

from distilkit.batch import Batch
from distilkit.callbacks.progress import PositionsProgressBar
from distilkit.commands.trainer import DistilCLI
from distilkit.data import TextDataModule
from distilkit.data.teacher_cache import CacheWriter, finalize_cache
from distilkit.errors import ConfigError
from distilkit.losses.chunked import chunk_slices
from distilkit.modules import DistillationModule
from distilkit.teachers import LiveTeacher, model_identity

SPLITS = ("train", "val")
DESCRIPTION = (
    "Run a recipe's teacher once over its training and validation blocks and store its targets (top-k or "
    "sampled); then train without the teacher: distilkit fit --config R.yaml --model.init_args.teacher null "
    "--model.init_args.teacher_cache DIR."
)


@dataclass(frozen=True)
class CacheOptions:
    """What ``distilkit cache`` stores, besides the recipe (which gives teacher, data and trainer).

    Args:
        output_dir: the cache directory (created; an unfinished cache there with the same settings is
            completed, one with other settings refused).
        mode: ``topk`` (the K most likely tokens with their log-probabilities, plus the tail's mass) or
            ``sample`` (S tokens drawn from the teacher's distribution: unbiased estimates of forward KL, the
            generalized JSD below β = 1 and the other losses with an estimate from draws).
        top_k: K, tokens kept per position in ``topk`` mode (3·K + 6 bytes per position).
        tail_samples: S, tokens drawn from the teacher's tail (outside the top K) after them in ``topk`` mode
            (3 bytes each; default 0). With them forward KL (and the other losses with an estimator from
            draws) sees the tail's shape; the other losses use the top K and the tail's mass as without.
        samples: S, draws per position in ``sample`` mode (3·S + 4 bytes per position).
        temperature: the temperature the targets are made at (default: the recipe loss's); a student trains
            from the cache with a loss at this temperature.
        seed: seeds the draws of ``sample`` mode and ``tail_samples`` (with each block's split and index).
        shard_blocks: blocks per shard file (default: about 128 MiB of targets).
    """

    output_dir: str
    mode: Literal["topk", "sample"] = "topk"
    top_k: int = 64
    tail_samples: int = 0
    samples: int = 12
    temperature: float | None = None
    seed: int = 0
    shard_blocks: int | None = None

    @property
    def entries(self) -> int:
        return self.top_k if self.mode == "topk" else self.samples


class TeacherPass(L.LightningModule):
    """The predict loop of ``distilkit cache``: the teacher of ``source`` over the blocks the cache lacks.

    The teacher's logits come as the module computes them in training (its ``teacher_forward`` and head), a
    few whole blocks at a time (``source.chunk_size`` tokens, at least one block), so at most one chunk's
    ``(blocks, T, V)`` logits exist at once. Every process opens its own writer (its rank names its shards)
    before any writes, so all agree on what is missing; padding repeats of a distributed sampler are skipped
    by the writer. When the loop ends each closes its writer and rank 0 writes the manifest.

    Args:
        source: the recipe's module (its teacher is the only part moved to the device).
        data: the recipe's data module.
        options: what to store.
    """

    def __init__(self, source: DistillationModule, data: TextDataModule, options: CacheOptions) -> None:
        super().__init__()
        if not isinstance(source.teacher_source, LiveTeacher):
            raise ConfigError(
                "model.teacher",
                None,
                "is needed: distilkit cache runs the recipe's teacher",
                "use a recipe with a teacher (e.g. recipes/quickstart.yaml)",
            )
        self.teacher_source = source.teacher_source  # registered: Lightning moves it to the device
        self._source = (source,)  # not registered: the student stays where it is
        self.data, self.options = data, options
        given = options.temperature
        self.temperature = float(source.loss.temperature if given is None else given)
        self.writer: CacheWriter | None = None
        self.splits: list[str] = []  # the split of each predict dataloader
        self.manifest: dict[str, Any] | None = None

    @property
    def source(self) -> DistillationModule:
        return self._source[0]

    def identity(self) -> dict[str, Any]:
        """What the targets are made from: the data module's identity and the teacher's (see
        :func:`~distilkit.teachers.model_identity`). A resumed run must match it; training compares the data's
        part."""
        return {
            **self.data.identity(),
            "teacher": model_identity(self.teacher_source.spec, self.teacher_source.model),
        }

    # -------------------------------------------------------------------------------------------- the loop
    def setup(self, stage: str) -> None:
        self.data.setup("fit")
        self.writer = CacheWriter(
            self.options.output_dir,
            mode=self.options.mode,
            entries=self.options.entries,
            temperature=self.temperature,
            vocab_size=self.source.vocab_size,
            block_size=self.data.block_size,
            num_blocks={split: len(self.data.datasets[split]) for split in SPLITS},
            identity=self.identity(),
            seed=self.options.seed,
            rank=self.global_rank,
            shard_blocks=self.options.shard_blocks,
            tail_samples=self.options.tail_samples,
        )  # every process reads the directory here, before Lightning's post-setup barrier and any write

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per split with blocks still missing, in block order."""
        assert self.writer is not None
        todo = {split: self.writer.missing(split) for split in SPLITS}
        self.splits = [split for split in SPLITS if todo[split]]
        return [
            DataLoader(
                Subset(self.data.datasets[split], todo[split]),
                batch_size=self.data.batch_size,
                num_workers=self.data.num_workers,
            )
            for split in self.splits
        ]

    def on_predict_start(self) -> None:
        self.teacher_source.check_head()

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Write the teacher's targets of the batch's blocks (``batch["block_index"]`` ``(B,)``)."""
        assert self.writer is not None
        teaching = self.teacher_source.teach(batch, "val")
        blocks, length = batch["block_index"], batch["input_ids"].shape[1]
        per_chunk = max(1, (self.source.chunk_size or blocks.numel() * length) // length)
        for rows in chunk_slices(blocks.numel(), per_chunk):
            logits = teaching.head(teaching.last[rows])  # (b, T, V)
            self.writer.write(self.splits[dataloader_idx], blocks[rows], logits)

    def on_predict_end(self) -> None:
        assert self.writer is not None
        self.writer.close()
        self.trainer.strategy.barrier("teacher_cache_closed")
        if self.trainer.is_global_zero:
            self.manifest = finalize_cache(self.options.output_dir)


def write_teacher_cache(
    trainer: Trainer, source: DistillationModule, data: TextDataModule, options: CacheOptions
) -> dict[str, Any] | None:
    """Run ``source``'s teacher over ``data``'s training and validation blocks and store its targets.

    Returns:
        The manifest on rank 0 (None on the other processes).
    """
    run = TeacherPass(source, data, options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*predict returned None.*")  # it writes, returns nothing
        warnings.filterwarnings("ignore", message=r".*across ranks is zero.*")  # nothing missing: no loaders
        trainer.predict(run, return_predictions=False)
    if trainer.is_global_zero and run.manifest is None:  # nothing was missing: the loop did not run
        run.manifest = finalize_cache(options.output_dir)
    return run.manifest


class CacheCLI(DistilCLI):
    """The recipe parsed as ``distilkit fit`` parses it, plus :class:`CacheOptions`; nothing of a run is
    written (no logger, no checkpoints), only the cache."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(CacheOptions, nested_key=None, as_group=True)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args`` (LightningCLI's own warns when they are not the whole command line)."""
        self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config
        model = config.model.init_args
        if model.get("teacher") is None:
            raise ConfigError(
                "model.init_args.teacher",
                None,
                "is needed: distilkit cache runs the recipe's teacher",
                "use the recipe with the teacher (e.g. recipes/quickstart.yaml) or --model.init_args.teacher",
            )
        if "teacher_cache" in model:
            model.teacher_cache = None  # the cache is being made, not read
        config.trainer.logger = False
        config.trainer.enable_model_summary = False

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init
        given = config.trainer.get("callbacks") or []
        callbacks = list(given if isinstance(given, list) else [given])
        if config.trainer.get("enable_progress_bar") is not False:
            callbacks.append(PositionsProgressBar(description="teacher"))
        return LightningCLI.instantiate_trainer(self, callbacks=callbacks, **kwargs)  # not a fit's callbacks

    def options(self) -> CacheOptions:
        names = CacheOptions.__dataclass_fields__
        return CacheOptions(**{name: self.config[name] for name in names})


def run_cache(args: list[str]) -> None:
    """``distilkit cache ...`` (``args`` as on the command line, from the command's name): parse the recipe,
    run the teacher, print a summary."""
    cli = CacheCLI(
        DistillationModule,
        TextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        run=False,
        args=args[1:],
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, "prog": "distilkit cache", "description": DESCRIPTION},
    )
    options = cli.options()
    manifest = write_teacher_cache(cli.trainer, cli.model, cli.datamodule, options)
    if manifest is not None:
        print_cache_summary(manifest, options.output_dir, Console())


def print_cache_summary(manifest: dict[str, Any], output_dir: str, console: Console) -> None:
    """What the cache holds, what it costs on disk, and how to train from it."""
    entries = f"K = {manifest['top_k']}" if manifest["mode"] == "topk" else f"S = {manifest['samples']}"
    if manifest.get("tail_samples"):
        entries += f" + S = {manifest['tail_samples']} tail draws"
    console.rule("distilkit cache")
    console.print(f"cache directory    {output_dir}", highlight=False)
    console.print(f"targets            {manifest['mode']}, {entries}, temperature {manifest['temperature']}")
    for split, info in manifest["splits"].items():
        console.print(f"{split + ' blocks':<18} {info['blocks']} of {manifest['num_blocks'][split]}")
    if not manifest["complete"]:
        console.print("[bold]incomplete:[/] run the same command again to complete it")
    per_token = manifest["bytes_per_token"]
    size = f"{manifest['bytes'] / 2**20:.1f} MiB" + (
        f", {per_token:.1f} bytes per token" if per_token else ""
    )
    console.print(f"on disk            {size}", highlight=False)
    print(f"train from it: distilkit fit --config RECIPE --model.init_args.teacher null "
          f"--model.init_args.teacher_cache '{Path(output_dir)}'")  # fmt: skip
