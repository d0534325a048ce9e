"""One run, one directory: where a run's files go, and refusing to write over an earlier run."""

from __future__ import annotations

import importlib
import netrc
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from distilkit.errors import ConfigError
from distilkit.models.checkpoint import check_seal
from distilkit.run.loggers import CSVLogger, WandbLogger, rewind_point, wandb_loggers

_RUN_MARKERS = ("config.yaml", "metrics.csv", "checkpoints")


def refuse_existing_run(root: str, resuming: bool) -> None:
    """Raise if ``root`` already holds a run and this fit does not resume it. Only the first process checks:
    under DDP the others start once it has begun writing the run."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    found = [name for name in _RUN_MARKERS if (Path(root) / name).exists()]
    if found and not resuming:
        raise ConfigError(
            "trainer.default_root_dir",
            root,
            f"already holds a run ({', '.join(found)})",
            "resume it with --ckpt_path last, or choose a new directory with --trainer.default_root_dir",
        )


#: ``--ckpt_path`` values that name the run's own newest ``last*.ckpt``.
LAST, LAST_OR_NEW = "last", "last_or_new"


def resolve_checkpoint(root: str, ckpt_path: str | None, subcommand: str) -> str | None:
    """The checkpoint file a command starts from, checked before anything is written.

    ``last`` is the newest ``last*.ckpt`` in ``root/checkpoints`` (Lightning writes ``last-v1.ckpt`` beside
    the old one when a run resumes from another checkpoint) and is refused when there is none, naming
    where it looked; ``last_or_new`` (fit only) starts a new run then. Any other path must be a file.
    """
    if ckpt_path is None:
        return None
    if ckpt_path in (LAST, LAST_OR_NEW):
        folder = Path(root) / "checkpoints"
        found = (
            sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
        )
        if found:
            return readable_checkpoint(str(found[-1]))
        if ckpt_path == LAST_OR_NEW and subcommand == "fit":
            return None
        fix = (
            "train it first, or pass --ckpt_path last_or_new to start a new run when there is none"
            if subcommand == "fit"
            else "give a checkpoint file, or the run's directory as --trainer.default_root_dir"
        )
        raise ConfigError("ckpt_path", ckpt_path, f"found no last*.ckpt in {folder}", fix)
    if not Path(ckpt_path).is_file():
        raise ConfigError(
            "ckpt_path", ckpt_path, "is not a file", "give a .ckpt file from a run's checkpoints/"
        )
    return readable_checkpoint(ckpt_path)


def readable_checkpoint(path: str) -> str:
    """``path``, after checking that it opens as a checkpoint (a truncated or foreign file is refused) and
    that its contents are the ones written (:func:`~distilkit.models.checkpoint.check_seal`)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            "ckpt_path",
            path,
            f"could not be read as a checkpoint ({reason})",
            "give a complete checkpoint written by distilkit fit (an interrupted save never replaces one)",
        ) from err
    check_seal(checkpoint, Path(path), "ckpt_path")
    return path


def resume_point(ckpt_path: str | None) -> tuple[str | None, int]:
    """``(W&B run id, global step)`` of the checkpoint a fit resumes from; ``(None, 0)`` for a new run."""
    if not ckpt_path:
        return None, 0
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("distilkit", {}).get("wandb_run_id"), int(checkpoint.get("global_step", 0))


def evaluation_directory(root: str, subcommand: str) -> str:
    """Where ``validate``/``test``/``predict`` of the run in ``root`` write: ``root/<subcommand>``, or
    ``root/<subcommand>-2``, ``-3`` ... when earlier evaluations are there (nothing is overwritten)."""
    number, path = 1, Path(root) / subcommand
    while path.exists():
        number += 1
        path = Path(root) / f"{subcommand}-{number}"
    return str(path)


def place_loggers(
    trainer_config: Namespace, root: str, resume_wandb_id: str | None = None, resume_step: int = 0
) -> None:
    """Put every logger's files under ``root`` and make sure a CSV logger writes ``root/metrics.csv``
    (distilkit's :class:`~distilkit.run.loggers.CSVLogger`, which appends when a run resumes). Lightning's
    CSV and W&B loggers become distilkit's (:mod:`distilkit.run.loggers`); a resumed fit continues the W&B run
    ``resume_wandb_id``, rewound to the checkpoint at optimizer step ``resume_step``.

    Loggers are jsonargparse namespaces here (``class_path`` + ``init_args``), edited before they are built.
    """
    loggers = trainer_config.get("logger")
    if loggers is False:
        return
    entries = [] if loggers in (None, True) else (loggers if isinstance(loggers, list) else [loggers])
    for entry in entries:
        cls = _logger_class(entry)
        if cls is LightningCSVLogger:
            entry["class_path"] = _path(CSVLogger)  # Lightning's own deletes metrics.csv when a run resumes
        if cls is LightningWandbLogger:
            entry["class_path"] = _path(WandbLogger)  # logs at the trainer's step, so a resume can rewind
    if not any(_is(entry, CSVLogger) for entry in entries):
        entries.insert(0, Namespace(class_path=_path(CSVLogger), init_args=Namespace()))
    for entry in entries:
        args = entry.get("init_args") or Namespace()
        entry["init_args"] = args
        if _is(entry, CSVLogger):
            args["save_dir"] = args.get("save_dir") or root
            args["name"], args["version"] = "", ""  # always RUN/metrics.csv
        elif "save_dir" in args and args.get("save_dir") in (None, ".", ""):
            args["save_dir"] = root
        if not _is(entry, LightningWandbLogger):
            continue
        if resume_wandb_id and not args.get("id"):
            args["id"] = resume_wandb_id  # Lightning passes resume="allow": the same run continues
            if _is(entry, WandbLogger) and resume_step > 0:
                # W&B's rewind: keep the rows up to the checkpoint, drop those the killed run logged after
                args["resume"] = None
                args["resume_from"] = f"{resume_wandb_id}?_step={rewind_point(resume_step)}"
        if not wandb_can_go_online():
            args["offline"] = True
            args["log_model"] = False  # artifacts cannot be uploaded offline (Lightning refuses the pair)
    trainer_config["logger"] = entries


def wandb_can_go_online() -> bool:
    """False when W&B is set offline/disabled, or no API key is configured (then a run would stop and ask
    for one): distilkit then runs the WandbLogger offline, and ``wandb sync`` uploads the run later."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def class_from_path(class_path: str) -> type | None:
    """The class a config's ``class_path`` names; None when it names none that imports (jsonargparse reports
    those to the user when it builds the config)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _logger_class(entry: Any) -> type | None:
    return class_from_path(str(entry.get("class_path", "")) if isinstance(entry, (Namespace, dict)) else "")


def _is(entry: Any, cls: type) -> bool:
    found = _logger_class(entry)
    return found is not None and issubclass(found, cls)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` when a fit starts; a resumed fit keeps the first one
    and writes ``config.resumed-N.yaml`` beside it. Nothing is saved for validate/test/predict."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = Path(trainer.log_dir or ".")
        number = 0
        while (log_dir / self.config_filename).exists():
            number += 1
            self.config_filename = f"config.resumed-{number}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give W&B the full resolved config, nested as in the YAML (not Lightning's flat hparams)."""
        for logger in wandb_loggers(trainer):
            logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


def snapshot(root: str | Path) -> dict[Path, int]:
    """Every path under ``root`` (and ``root`` itself) with its modification time, before a command writes."""
    base = Path(root)
    if not base.exists():
        return {}
    return {p: p.stat().st_mtime_ns for p in [base, *base.rglob("*")]}


@contextmanager
def undo_failed_start(root: str | Path, before: dict[Path, int]) -> Iterator[None]:
    """Leave ``root`` as it was (``before``, from :func:`snapshot`) when the command fails before it wrote
    a checkpoint: the files and directories it created (``config.yaml``, ``metrics.csv``, an evaluation's
    directory, W&B files ...) are removed, so the next command starts clean. Once a checkpoint has been
    written the run is real and everything is kept."""
    try:
        yield
    except BaseException:
        if not _wrote_a_checkpoint(Path(root), before):
            created = [p for p in snapshot(root) if p not in before]
            for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _wrote_a_checkpoint(root: Path, before: dict[Path, int]) -> bool:
    return any(before.get(p) != p.stat().st_mtime_ns for p in root.rglob("*.ckpt") if p.is_file())
