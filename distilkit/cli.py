"""The ``distilkit`` command: LightningCLI's fit/validate/test/predict, plus export."""

from __future__ import annotations

import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from distilkit.checkpoint_io import AtomicCheckpointIO
from distilkit.curriculum import CurriculumCallback
from distilkit.data import TextDataModule
from distilkit.errors import ConfigError, TrainingStopped
from distilkit.loggers import wandb_loggers
from distilkit.module import DistillationModule
from distilkit.plot import draw_run_curve
from distilkit.progress import DistilProgressBar
from distilkit.run_dir import (
    CheckpointOnSigterm,
    SaveRunConfig,
    place_loggers,
    refuse_existing_run,
    resume_point,
)

#: Commands beyond LightningCLI's own, each ``name -> "module:function"`` taking ``args``.
EXTRA_COMMANDS = {
    "export": "distilkit.export:export_main",
    "generate": "distilkit.generate:generate_main",
    "evaluate": "distilkit.evaluate:evaluate_main",
    "plot": "distilkit.plot:plot_main",
}


class DistilCLI(LightningCLI):
    """LightningCLI wired for distillation runs.

    - The data module's tokenizer fills the model's ``vocab_size``, ``block_size`` and ``eos_token_id``.
    - SIGTERM writes ``last.ckpt`` and exits with status 143 (:class:`~.run_dir.CheckpointOnSigterm`).
    - Checkpoints are written atomically (:class:`~distilkit.checkpoint_io.AtomicCheckpointIO`).
    - Everything a run writes goes under ``trainer.default_root_dir``: ``config.yaml``, ``metrics.csv``
      (a CSV logger is always present), ``checkpoints/`` (``last.ckpt`` always kept), other loggers' files.
    - A fit refuses a directory that already holds a run unless it resumes it (``--ckpt_path``).
    - The progress bar (``--progress_bar.*``) shows loss, curriculum stage and tokens per second.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("vocab_size", "block_size", "eos_token_id"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": None})
        parser.add_lightning_class_args(DistilProgressBar, "progress_bar")

    def _parse_ckpt_path(self) -> None:
        """Keep the config as given. LightningCLI would overwrite the model's config with the checkpoint's
        ``hyper_parameters``, which leave out the loss, optimizer and scheduler (they are objects): a fit
        resumed from an explicit checkpoint path silently went on with the default loss (temperature 1)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        root = config.trainer.get("default_root_dir") or "runs/default"
        config.trainer.default_root_dir = root
        if self.subcommand == "fit":
            refuse_existing_run(root, resuming=config.get("ckpt_path") is not None)
        wandb_id, step = resume_point(root, config.get("ckpt_path"))
        rewind_to = step if self.subcommand == "fit" else 0  # validate/test never rewind a run's history
        place_loggers(config.trainer, root, resume_wandb_id=wandb_id, resume_step=rewind_to)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, writing checkpoints atomically unless the config names its own plugins."""
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        trainer: Any = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(CheckpointOnSigterm())
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """``--trainer.enable_progress_bar false`` drops the ``progress_bar`` group's bar (Lightning would
        refuse a progress bar callback beside it)."""
        if config.get("enable_progress_bar") is False:
            callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        callbacks: list[Any] = getattr(self.trainer, "callbacks", [])
        if not any(isinstance(c, CurriculumCallback) for c in callbacks):
            draw_run_curve(self.trainer)  # the curriculum draws its own, with stage names
        print_summary(self.trainer, Console())
        finish_wandb(self.trainer)


def finish_wandb(trainer) -> None:
    """Close the W&B run the command started, so its files are complete when ``main`` returns (Lightning
    leaves it open, which only the end of the process would close)."""
    if trainer.is_global_zero:
        for logger in wandb_loggers(trainer):
            logger.experiment.finish()


def print_summary(trainer, console: Console) -> None:
    """Where the run is, the last validation perplexities, and how to export the student."""
    if not trainer.is_global_zero:
        return
    metrics = trainer.callback_metrics
    root = Path(trainer.default_root_dir)
    checkpoint = trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", "") or ""
    lines = [f"run directory      {root}"]
    for key, label in (
        ("val/teacher_ppl", "teacher val ppl"),
        ("val/ppl", "student val ppl"),
        ("val/top1_agreement", "top-1 agreement"),
    ):
        if key in metrics:
            lines.append(f"{label:<18} {float(metrics[key]):.2f}")
    if last:
        lines.append(
            f"export the student: distilkit export --ckpt_path {last} --output_dir {root / 'export'}"
        )
    console.rule("distilkit")
    for line in lines:
        console.print(line, highlight=False)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``distilkit`` script; ``args`` defaults to ``sys.argv[1:]``.

    A :class:`~distilkit.errors.ConfigError` (a mistake the user can fix) ends with one line on stderr
    and exit status 2, with no traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module_name, function_name = EXTRA_COMMANDS[argv[0]].split(":")
            module = __import__(module_name, fromlist=[function_name])
            getattr(module, function_name)(argv[1:])
            return
        torch.set_float32_matmul_precision("high")
        # The frozen teacher is in eval mode on purpose; Lightning warns about every such module.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        DistilCLI(
            DistillationModule,
            TextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
        )
    except SIGTERMException:
        Console(stderr=True).print(
            "[bold]stopped by SIGTERM:[/] last.ckpt written; resume with --ckpt_path last"
        )
        sys.exit(143)
    except TrainingStopped as err:
        Console(stderr=True).print(f"[bold red]stopped:[/] {err}", highlight=False)
        sys.exit(1)
    except ArgumentError as err:
        Console(stderr=True).print(
            f"[bold red]error:[/] {err}\nSee `distilkit {argv[0] if argv else ''} --help`.", highlight=False
        )
        sys.exit(2)
    except Exception as err:
        user_error = find_config_error(err)
        if user_error is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {user_error}", highlight=False)
        sys.exit(2)


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` behind ``err``: jsonargparse and Lightning re-raise it wrapped."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
