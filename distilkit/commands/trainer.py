"""``distilkit fit | validate | test | predict``: Lightning's own CLI, wired for distillation runs."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from distilkit.callbacks.learning_curve import LearningCurve
from distilkit.callbacks.predictions import PredictionWriter
from distilkit.callbacks.progress import DistilProgressBar
from distilkit.commands.quiet import RESUMABLE_DATA_WARNING
from distilkit.data import TextDataModule
from distilkit.errors import ConfigError, TrainingStopped
from distilkit.modules import MutualDistillationModule
from distilkit.run import RunState
from distilkit.run.checkpoint_io import AtomicCheckpointIO
from distilkit.run.directory import (
    SaveRunConfig,
    class_from_path,
    evaluation_directory,
    place_loggers,
    refuse_existing_run,
    resolve_checkpoint,
    resume_point,
    snapshot,
    undo_failed_start,
)
from distilkit.run.loggers import CSVLogger, wandb_loggers
from distilkit.run.signals import (
    CheckpointAtEnd,
    CheckpointOnInterrupt,
    CheckpointOnSigterm,
    CheckpointOnTeacherUnavailable,
)
from distilkit.run.state import teacher_identity
from distilkit.teachers import describe_teacher

PREDICTIONS_FILE = "predictions.jsonl"
#: What the CPU allocator says when it runs out (CUDA raises ``torch.OutOfMemoryError``).
OUT_OF_MEMORY = ("DefaultCPUAllocator", "not enough memory", "out of memory", "can't allocate memory")


class DistilCLI(LightningCLI):
    """LightningCLI wired for distillation runs.

    - The data module's tokenizer fills the model's ``vocab_size``, ``block_size`` and ``eos_token_id``.
    - Everything a fit writes goes under ``trainer.default_root_dir``: ``config.yaml``, ``metrics.csv``
      (a CSV logger is always present), ``checkpoints/`` (``last.ckpt`` always kept, written atomically),
      ``learning_curve.png``, other loggers' files. A fit refuses a directory that already holds a run
      unless it resumes it (``--ckpt_path``).
    - ``validate``, ``test`` and ``predict`` leave the run's files as they are: they write into their own
      directory beside them (``RUN/validate``, ``RUN/predict-2`` ...); ``predict`` writes
      ``predictions.jsonl`` there.
    - ``--ckpt_path last`` is the run's newest ``last*.ckpt``, refused when there is none.
    - SIGTERM writes ``last.ckpt`` and exits with status 143 (:class:`~distilkit.run.CheckpointOnSigterm`);
      Ctrl-C writes it and exits with 130; a fit that ends writes it at its final step.
    - The progress bar (``--progress_bar.*``) shows loss, curriculum stage and tokens per second.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("vocab_size", "block_size", "eos_token_id"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt is always the newest (no last-v1.ckpt beside it when a run resumes from another file)
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.monitor": None,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_class_arguments(DistilProgressBar, "progress_bar", instantiate=False)
        parser.add_argument(
            "--allow_teacher_change",
            type=bool,
            default=False,
            help="resume a fit with another teacher than its checkpoint's, on purpose (refused otherwise); "
            "the checkpoint records both",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``, the command line distilkit passes (LightningCLI's own warns, with the whole
        argument list, whenever ``args`` is given and ``sys.argv`` is not empty: always, here)."""
        self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Keep the config as given. LightningCLI would overwrite the model's config with the checkpoint's
        ``hyper_parameters``, which leave out the loss, optimizer and scheduler (they are objects): a fit
        resumed from an explicit checkpoint path silently went on with the default loss (temperature 1).
        (Private in Lightning: see :mod:`distilkit.run.lightning_internals`.)"""

    def before_instantiate_classes(self) -> None:
        subcommand = str(self.subcommand)
        config = self.config[subcommand]
        root = config.trainer.get("default_root_dir") or "runs/default"
        if Path(root).exists() and not Path(root).is_dir():
            raise ConfigError(
                "trainer.default_root_dir", root, "is a file, not a directory", "give a directory for the run"
            )
        config.trainer.default_root_dir = root
        asked = config.get("ckpt_path")
        config.ckpt_path = resolve_checkpoint(root, asked, subcommand)
        if subcommand == "fit":
            refuse_manual_optimization_settings(config)
            refuse_existing_run(root, resuming=asked is not None)
            if asked is not None and config.ckpt_path is None:  # last_or_new, and nothing to resume
                CSVLogger(save_dir=root).rewind(-1)  # rows of an attempt that never checkpointed
            wandb_id, step = resume_point(config.ckpt_path)
            place_loggers(config.trainer, root, resume_wandb_id=wandb_id, resume_step=step)
        else:  # an evaluation never writes into the run's own files
            config.trainer.default_root_dir = evaluation_directory(root, subcommand)
            place_loggers(config.trainer, config.trainer.default_root_dir)
        self.started_from = snapshot(root)  # what the directory held before this command wrote anything

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer with distilkit's callbacks, writing checkpoints atomically unless the config names
        its own plugins."""
        config = self.config_init[self.subcommand]
        if not config.trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        given = config.trainer.get("callbacks") or []
        callbacks = [*(given if isinstance(given, list) else [given]), CheckpointOnSigterm()]
        callbacks += [CheckpointOnInterrupt(), CheckpointOnTeacherUnavailable()]
        if config.trainer.get("enable_progress_bar") is not False:
            callbacks.append(DistilProgressBar(**config.progress_bar))
        if self.subcommand == "fit":
            callbacks += [CheckpointAtEnd(), LearningCurve()]
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(Path(config.trainer.default_root_dir) / PREDICTIONS_FILE))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    # LightningCLI runs a method named after the subcommand when the CLI has one.
    def fit(self, model: Any, **kwargs: Any) -> None:
        model.allow_teacher_change = bool(self.config["fit"].get("allow_teacher_change"))
        with self._guarded(), warnings.catch_warnings():
            data = kwargs.get("datamodule")
            if data is not None and type(data).state_dict is not LightningDataModule.state_dict:
                # it keeps its place in the data itself (TextDataModule): Lightning's warning is wrong here
                warnings.filterwarnings("ignore", message=RESUMABLE_DATA_WARNING)
            self.trainer.fit(model, **self._known_checkpoint(kwargs))

    def validate(self, model: Any, **kwargs: Any) -> None:
        with self._guarded():
            self.trainer.validate(model, **self._known_checkpoint(kwargs))

    def test(self, model: Any, **kwargs: Any) -> None:
        with self._guarded():
            self.trainer.test(model, **self._known_checkpoint(kwargs))

    def predict(self, model: Any, **kwargs: Any) -> None:
        with self._guarded():
            self.trainer.predict(model, **self._known_checkpoint(kwargs))

    def _known_checkpoint(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` without ``ckpt_path``, which is set on the trainer instead (``trainer.ckpt_path``): so
        the module's ``setup`` knows a checkpoint will replace its weights (Lightning sets it only after
        ``setup`` otherwise), and a resumed ``from_teacher`` student is not calibrated again."""
        ckpt_path = kwargs.pop("ckpt_path", None)
        if ckpt_path is not None:
            self.trainer.ckpt_path = ckpt_path
        return kwargs

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """A failure before the first checkpoint leaves the run directory as it was; running out of memory
        ends with one line naming the settings to lower."""
        config = self.config[str(self.subcommand)]
        with (
            undo_failed_start(config.trainer.default_root_dir, self.started_from),
            out_of_memory_hint(self.trainer, config),
        ):
            yield

    def after_fit(self) -> None:
        print_summary(self.trainer, Console())
        finish_wandb(self.trainer)

    def after_predict(self) -> None:
        if self.trainer.is_global_zero:
            print(f"wrote {Path(self.trainer.default_root_dir) / PREDICTIONS_FILE}")


@contextmanager
def out_of_memory_hint(trainer: Trainer, config: Any) -> Iterator[None]:
    """Turn an out-of-memory error (CUDA's, or the CPU allocator's) into a :class:`TrainingStopped` naming
    the batch, block and chunk sizes to lower and the last checkpoint, which an atomic save kept whole."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, torch.OutOfMemoryError) and not any(m in text for m in OUT_OF_MEMORY):
            raise
        data, model = (
            config.get("data", {}).get("init_args", {}),
            config.get("model", {}).get("init_args", {}),
        )
        settings = ", ".join(
            f"{name}={value}"
            for name, value in (
                ("data.batch_size", data.get("batch_size")),
                ("data.block_size", data.get("block_size")),
                ("model.init_args.chunk_size", model.get("chunk_size")),
            )
            if value is not None
        )
        checkpoint: Any = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or "none was written"
        raise TrainingStopped(
            f"out of memory at step {trainer.global_step}; lower one of {settings} "
            f"(or give the run more memory). Last good checkpoint: {last}"
        ) from err


def run_lightning(args: list[str]) -> None:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) with ``args``."""
    DistilCLI(
        LightningModule,  # any module: DistillationModule, MutualDistillationModule, a user's own
        TextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        args=args,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
    )


def finish_wandb(trainer: Trainer) -> None:
    """Close the W&B run the command started, so its files are complete when the command returns
    (Lightning leaves it open, which only the end of the process would close)."""
    if trainer.is_global_zero:
        for logger in wandb_loggers(trainer):
            logger.experiment.finish()


def print_summary(trainer: Trainer, console: Console) -> None:
    """Where the run is, the last validation perplexities, and how to export the student."""
    if not trainer.is_global_zero:
        return
    metrics = trainer.callback_metrics
    root = Path(trainer.default_root_dir)
    checkpoint: Any = trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", "") or ""
    lines = [f"run directory      {root}", f"teacher            {run_teacher(trainer)}"]
    for key, label in (
        ("val/teacher_ppl", "teacher val ppl"),
        ("val/ppl", "student val ppl"),
        ("val/top1_agreement", "top-1 agreement"),
    ):
        if key in metrics:
            lines.append(f"{label:<18} {float(metrics[key]):.2f}")
    peers = sorted(k.split("/")[1] for k in metrics if k.startswith("val/peer") and k.endswith("/ppl"))
    names = list(getattr(trainer.lightning_module, "names", None) or [])
    for peer in peers:
        index = int(peer.removeprefix("peer")) if peer.removeprefix("peer").isdigit() else -1
        label = names[index] if 0 <= index < len(names) else peer
        lines.append(f"{label + ' val ppl':<18} {float(metrics[f'val/{peer}/ppl']):.2f}")
    console.rule("distilkit")
    for line in lines:
        console.print(line, markup=False, emoji=False, highlight=False)  # as written: paths, names
    if not last:
        return
    # printed whole (never wrapped), so it can be copied and run; a cohort's export needs --peer (whether or
    # not a validation ran), one command per peer
    command = f"distilkit export --ckpt_path '{last}'"
    if isinstance(trainer.lightning_module, MutualDistillationModule):
        for name in map(str, trainer.lightning_module.names):
            print(f"export peer {name}: {command} --output_dir '{root / ('export-' + name)}' --peer {name}")
    else:
        print(f"export the student: {command} --output_dir '{root / 'export'}'")


def run_teacher(trainer: Trainer) -> str:
    """What taught the run, in one line: the teacher (or cache) of its last checkpoint, and the earlier ones
    when it was changed on a resume; the peers of a cohort."""
    module = trainer.lightning_module
    if isinstance(module, MutualDistillationModule):
        return f"none: the peers teach each other ({', '.join(map(str, module.names))})"
    text = describe_teacher(teacher_identity(module))
    state = next((c for c in trainer.callbacks if isinstance(c, RunState)), None)  # type: ignore[attr-defined]
    for earlier in reversed(state.earlier_teachers if state is not None else []):
        text += f"; until step {earlier['until_step']}: {describe_teacher(earlier['teacher'])}"
    return text


def refuse_manual_optimization_settings(config: Any) -> None:
    """A cohort updates its peers itself (manual optimization), where Lightning refuses the trainer's
    gradient clipping and accumulation with a traceback: refuse them first, naming the setting to use."""
    cls = class_from_path(str((config.get("model") or {}).get("class_path") or ""))
    if cls is None or not issubclass(cls, MutualDistillationModule):
        return
    trainer = config.trainer
    if trainer.get("gradient_clip_val") is not None:
        raise ConfigError(
            "trainer.gradient_clip_val",
            trainer.gradient_clip_val,
            "is not used by a cohort (each peer is updated by the module itself)",
            "set model.init_args.gradient_clip_val instead (each peer is clipped by its own norm)",
        )
    if int(trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches",
            trainer.accumulate_grad_batches,
            "is not supported by a cohort (its peers are updated on every batch)",
            "raise data.batch_size instead",
        )
