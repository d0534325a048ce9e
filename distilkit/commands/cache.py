"""``distilkit cache``: run a recipe's teacher once over its data and store its targets for later training.

    distilkit cache --config R.yaml --output_dir DIR --mode topk --top_k 64  (or --mode sample --samples 12)
    distilkit cache --config R.yaml --output_dir DIR --mode topk --top_k 32 --tail_samples 32
    distilkit cache --config R.yaml --output_dir DIR --server URL --model NAME --top_k 20  (a served teacher)
    distilkit fit --config R.yaml --model.init_args.teacher null --model.init_args.teacher_cache DIR

The recipe is parsed as ``distilkit fit`` parses it (``--trainer.*``, ``--data.*``, ``--model.*`` overrides
work), then a Lightning predict loop (:class:`TeacherPass`) runs the teacher over the training and validation
blocks the cache does not hold yet (an interrupted run resumes) on the trainer's devices and processes. Each
process writes its own shards (:class:`~distilkit.data.teacher_cache.CacheWriter`); once all have finished,
rank 0 merges them into ``manifest.json``, which records the teacher, the data's identity, the settings and
``bytes_per_token``. The format is described in :mod:`distilkit.data.teacher_cache.format`.

With ``--server URL --model NAME`` the teacher is a vLLM server (:mod:`distilkit.teachers.served`) instead of
the recipe's: its top-K answers are stored as they come (top-k mode, temperature 1), the loaders read ahead
so that the server always has blocks to score, and the recipe's teacher is never loaded. A server that fails
for longer than its retry window stops the command with one line; the blocks already scored are on disk
and the same command completes the cache.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI
from rich.console import Console
from torch.utils.data import DataLoader, Subset

from distilkit.batch import Batch
from distilkit.callbacks.progress import PositionsProgressBar
from distilkit.commands.trainer import DistilCLI
from distilkit.data import TextDataModule
from distilkit.data.teacher_cache import CacheWriter, finalize_cache
from distilkit.data.teacher_cache.format import MANIFEST
from distilkit.errors import ConfigError, RunInterrupted
from distilkit.files import check_writable
from distilkit.losses.chunked import chunk_slices
from distilkit.modules import DistillationModule
from distilkit.run.signals import GracefulStop
from distilkit.teachers import AlignedTeacher, LiveTeacher, for_data, model_identity
from distilkit.teachers.served import ServedTeacherSource, is_served

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
        server: a vLLM server's URL to take the targets from instead of the recipe's teacher (top-k mode,
            K = ``top_k``, temperature 1).
        served_model: the served model's name (``--model NAME`` on the command line when ``--server`` is
            given). A recipe whose teacher is served already needs neither; its other settings (retries,
            look-ahead) are kept, and ``top_k`` is the cache's K.
    """

    output_dir: str
    mode: Literal["topk", "sample"] = "topk"
    top_k: int = 64
    tail_samples: int = 0
    samples: int = 12
    temperature: float | None = None
    seed: int = 0
    shard_blocks: int | None = None
    server: str | None = None
    served_model: str | None = None

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

    def __init__(
        self,
        source: DistillationModule,
        data: TextDataModule,
        options: CacheOptions,
        command: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(for_data(source.teacher_source, data.tokenizer), AlignedTeacher):
            raise ConfigError(
                "model.teacher",
                source.hparams.get("teacher"),
                "reads the text with another tokenizer than data.tokenizer, and a teacher cache cannot hold "
                "what a student with another tokenizer learns from: cached targets are a few entries per "
                "position of the data's blocks, while the cross-tokenizer losses (ULDLoss, GOLDLoss) need "
                "the teacher's whole distribution over its own vocabulary where the two tokenizations align",
                "train with the live teacher (distilkit fit --config R.yaml), or cache a teacher that "
                "shares data.tokenizer",
            )
        teacher = source.teacher_source
        if not isinstance(teacher, (LiveTeacher, ServedTeacherSource)):
            raise ConfigError(
                "model.teacher",
                None,
                "is needed: distilkit cache runs the recipe's teacher",
                "use a recipe with a teacher (e.g. recipes/quickstart.yaml), or --server URL --model NAME",
            )
        self.teacher_source = teacher  # registered: Lightning moves it to the device
        self._source = (source,)  # not registered: the student stays where it is
        self.data, self.options = data, options
        given = options.temperature
        self.temperature = float(source.loss.temperature if given is None else given)
        if isinstance(teacher, ServedTeacherSource):
            self.temperature = check_served_options(options)
        self.writer: CacheWriter | None = None
        self.splits: list[str] = []  # the split of each predict dataloader
        self.manifest: dict[str, Any] | None = None
        self.command = command  # recorded in the manifest: what rewrites a damaged shard
        self.stop = GracefulStop(
            "this batch, then writing the blocks computed so far",
            "shards already written are kept; the same command computes the rest",
        )

    @property
    def source(self) -> DistillationModule:
        return self._source[0]

    def identity(self) -> dict[str, Any]:
        """What the targets are made from: the data module's identity and the teacher's (see
        :func:`~distilkit.teachers.model_identity`). A resumed run must match it; training compares the data's
        part."""
        teacher = self.teacher_source
        if isinstance(teacher, ServedTeacherSource):
            return {**self.data.identity(), "teacher": teacher.identity()}
        return {**self.data.identity(), "teacher": model_identity(teacher.spec, teacher.model)}

    # -------------------------------------------------------------------------------------------- the loop
    def setup(self, stage: str) -> None:
        self.data.setup("fit")
        if isinstance(self.teacher_source, ServedTeacherSource):  # its identity, before anything is written
            self.teacher_source.check_server(self.data.tokenizer, self.data.block_size)
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
            command=self.command,
        )  # every process reads the directory here, before Lightning's post-setup barrier and any write

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per split with blocks still missing, in block order."""
        assert self.writer is not None
        todo = {split: self.writer.missing(split) for split in SPLITS}
        self.splits = [split for split in SPLITS if todo[split]]
        loaders = [
            DataLoader(
                Subset(self.data.datasets[split], todo[split]),
                batch_size=self.data.batch_size,
                num_workers=self.data.num_workers,
            )
            for split in self.splits
        ]
        teacher = self.teacher_source
        if isinstance(teacher, ServedTeacherSource):  # the server scores the next batches while one is stored
            return [teacher.read_ahead(loader, "val") for loader in loaders]  # type: ignore[misc]
        return loaders

    def configure_callbacks(self) -> list[Callback]:
        return [FlushOnFailure()]

    def on_predict_start(self) -> None:
        self.teacher_source.check_head()
        self.stop.start()

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Write the teacher's targets of the batch's blocks (``batch["block_index"]`` ``(B,)``)."""
        assert self.writer is not None
        if isinstance(self.teacher_source, ServedTeacherSource):
            targets = self.teacher_source.teach(batch, "val").targets  # (B, T, K)
            self.writer.write_targets(self.splits[dataloader_idx], batch["block_index"], targets)
            return
        teaching = self.teacher_source.teach(batch, "val")
        blocks, length = batch["block_index"], batch["input_ids"].shape[1]
        per_chunk = max(1, (self.source.chunk_size or blocks.numel() * length) // length)
        for rows in chunk_slices(blocks.numel(), per_chunk):
            logits = teaching.head(teaching.last[rows])  # (b, T, V)
            self.writer.write(self.splits[dataloader_idx], blocks[rows], logits)

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """After Ctrl-C: write the blocks computed so far, record them, and stop with exit status 130; the
        same command computes only the rest. Each process decides alone (a per-batch collective would wait
        forever: the processes' shares of the blocks differ by up to a batch); they meet again at
        :meth:`on_predict_end`'s barrier, which a process reaches when stopped or at the end of its share."""
        if not self.stop.requested:
            return
        self.on_predict_end()
        manifest = self.manifest or {}
        kept = sum(info["blocks"] for info in manifest.get("splits", {}).values())
        total = sum(manifest.get("num_blocks", {}).values())
        raise RunInterrupted(
            f"Ctrl-C: {kept} of {total} blocks are in {self.options.output_dir}; "
            "run the same command again to compute only the rest"
        )

    def on_predict_end(self) -> None:
        assert self.writer is not None
        self.stop.stop()
        self.writer.close()
        self.trainer.strategy.barrier("teacher_cache_closed")
        if self.trainer.is_global_zero:
            self.manifest = finalize_cache(self.options.output_dir)


class FlushOnFailure(Callback):
    """A cache run that fails (a teacher server that stopped answering) first writes the blocks it has
    encoded, so that the same command goes on from there."""

    def on_exception(self, trainer: Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        writer = getattr(pl_module, "writer", None)
        if isinstance(writer, CacheWriter):
            writer.close()


def check_served_options(options: CacheOptions) -> float:
    """A server's answers are top-k targets at temperature 1: refuse other settings; the temperature."""
    if options.mode != "topk":
        raise ConfigError(
            "mode", options.mode, "is not what a served teacher gives (its top-K answers)", "use --mode topk"
        )
    if options.tail_samples:
        raise ConfigError(
            "tail_samples",
            options.tail_samples,
            "needs the teacher's whole distribution, which a served teacher does not give (only its top K)",
            "leave --tail_samples out",
        )
    if options.temperature not in (None, 1.0):
        raise ConfigError(
            "temperature",
            options.temperature,
            "is not what a served teacher gives (temperature 1)",
            "leave --temperature out (train with a loss at temperature 1)",
        )
    return 1.0


def write_teacher_cache(
    trainer: Trainer,
    source: DistillationModule,
    data: TextDataModule,
    options: CacheOptions,
    command: str | None = None,
) -> dict[str, Any] | None:
    """Run ``source``'s teacher over ``data``'s training and validation blocks and store its targets.

    Args:
        command: the command line that runs this, recorded in the manifest (it repairs a damaged shard).

    Returns:
        The manifest on rank 0 (None on the other processes).

    Raises:
        RunInterrupted: Ctrl-C; the blocks computed so far are on disk.
    """
    run = TeacherPass(source, data, options, command)
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

    def before_instantiate_classes(self) -> None:
        config = self.config
        output = Path(config.output_dir)
        if output.exists() and not output.is_dir():  # checked before the teacher is loaded
            raise ConfigError("output_dir", str(output), "is a file, not a directory", "give a directory")
        check_writable(output / MANIFEST, "output_dir")
        model = config.model.init_args
        served = dict(model.teacher) if is_served(model.get("teacher")) else None
        if config.get("server"):  # the server replaces the recipe's teacher, which is never loaded
            if not config.get("served_model"):
                raise ConfigError(
                    "model",
                    None,
                    "names the served model, and is needed with --server",
                    "add --model NAME (the server's --served-model-name)",
                )
            served = {**(served or {}), "server": config.server, "model": config.served_model}
        if served is not None:  # the recipe's other settings (retries ...) kept; K is the cache's
            model.teacher = {**served, "top_k": config.top_k}
        elif model.get("teacher") is None:
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
        args=served_model_argument(args[1:]),
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, "prog": "distilkit cache", "description": DESCRIPTION},
    )
    options = cli.options()
    command = shlex.join(["distilkit", *args])
    manifest = write_teacher_cache(cli.trainer, cli.model, cli.datamodule, options, command)
    if manifest is not None:
        print_cache_summary(manifest, options.output_dir, Console())


def served_model_argument(args: list[str]) -> list[str]:
    """With ``--server``, ``--model NAME`` names the served model (as ``teacher: {server, model}`` does), not
    the module class: it is passed on as ``--served_model NAME`` (``--model.*`` options are left alone)."""
    if not any(arg == "--server" or arg.startswith("--server=") for arg in args):
        return args
    out: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--model":
            out += ["--served_model", next(rest, "")]
        elif arg.startswith("--model="):
            out.append("--served_model=" + arg.removeprefix("--model="))
        else:
            out.append(arg)
    return out


def print_cache_summary(manifest: dict[str, Any], output_dir: str, console: Console) -> None:
    """What the cache holds, what it costs on disk, and how to train from it (printed as written)."""

    def say(line: str) -> None:
        console.print(line, markup=False, emoji=False, highlight=False)

    entries = f"K = {manifest['top_k']}" if manifest["mode"] == "topk" else f"S = {manifest['samples']}"
    if manifest.get("tail_samples"):
        entries += f" + S = {manifest['tail_samples']} tail draws"
    console.rule("distilkit cache")
    say(f"cache directory    {output_dir}")
    say(f"targets            {manifest['mode']}, {entries}, temperature {manifest['temperature']}")
    for split, info in manifest["splits"].items():
        say(f"{split + ' blocks':<18} {info['blocks']} of {manifest['num_blocks'][split]}")
    if not manifest["complete"]:
        say("incomplete: run the same command again to complete it")
    per_token = manifest["bytes_per_token"]
    size = f"{manifest['bytes'] / 2**20:.1f} MiB" + (
        f", {per_token:.1f} bytes per token" if per_token else ""
    )
    say(f"on disk            {size}")
    print(f"train from it: distilkit fit --config RECIPE --model.init_args.teacher null "
          f"--model.init_args.teacher_cache '{Path(output_dir)}'")  # fmt: skip
