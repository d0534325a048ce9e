"""One run, one directory: where a run's files go, and refusing to write over an earlier run."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distilkit.errors import ConfigError
from distilkit.loggers import rewind_point, wandb_loggers

CSV_LOGGER = "distilkit.loggers.CSVLogger"
WANDB_LOGGER = "distilkit.loggers.WandbLogger"
_LIGHTNING_WANDB = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger")
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


def resume_point(root: str, ckpt_path: str | None) -> tuple[str | None, int]:
    """``(W&B run id, global step)`` of the checkpoint a fit resumes from (``--ckpt_path last`` means the
    run's ``last.ckpt``); ``(None, 0)`` when the fit does not resume."""
    if not ckpt_path:
        return None, 0
    path = Path(root) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        return None, 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("distilkit", {}).get("wandb_run_id"), int(checkpoint.get("global_step", 0))


def place_loggers(
    trainer_config: Namespace, root: str, resume_wandb_id: str | None = None, resume_step: int = 0
) -> None:
    """Put every logger's files under ``root`` and make sure a CSV logger writes ``root/metrics.csv``
    (distilkit's :class:`~distilkit.loggers.CSVLogger`, which appends when a run resumes). Lightning's
    CSV and W&B loggers become distilkit's (:mod:`distilkit.loggers`); a resumed fit continues the W&B run
    ``resume_wandb_id``, rewound to the checkpoint at optimizer step ``resume_step``.

    Loggers are jsonargparse namespaces here (``class_path`` + ``init_args``), edited before they are built.
    """
    loggers = trainer_config.get("logger")
    if loggers is False:
        return
    entries = [] if loggers in (None, True) else (loggers if isinstance(loggers, list) else [loggers])
    for entry in entries:
        if _class_path(entry).endswith(".CSVLogger"):
            entry["class_path"] = CSV_LOGGER  # Lightning's own deletes metrics.csv when a run resumes
        if _class_path(entry) in _LIGHTNING_WANDB:
            entry["class_path"] = WANDB_LOGGER  # logs at the trainer's step, so a resume can rewind
    if not any(_class_path(entry) == CSV_LOGGER for entry in entries):
        entries.insert(0, Namespace(class_path=CSV_LOGGER, init_args=Namespace()))
    for entry in entries:
        args = entry.get("init_args") or Namespace()
        entry["init_args"] = args
        if _class_path(entry) == CSV_LOGGER:
            args["save_dir"] = args.get("save_dir") or root
            args["name"], args["version"] = "", ""
        elif "save_dir" in args and args.get("save_dir") in (None, ".", ""):
            args["save_dir"] = root
        if _class_path(entry).endswith("WandbLogger") and resume_wandb_id and not args.get("id"):
            args["id"] = resume_wandb_id  # Lightning passes resume="allow": the same run continues
            if _class_path(entry) == WANDB_LOGGER and resume_step > 0:
                # W&B's rewind: keep the rows up to the checkpoint, drop those the killed run logged after
                args["resume"] = None
                args["resume_from"] = f"{resume_wandb_id}?_step={rewind_point(resume_step)}"
        if _class_path(entry).endswith("WandbLogger") and not wandb_can_go_online():
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


def _class_path(entry: Any) -> str:
    return str(entry.get("class_path", "")) if isinstance(entry, (Namespace, dict)) else ""


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


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, ``kill``), write ``last.ckpt`` before the process exits.

    Lightning stops at the end of the running step and raises ``SIGTERMException``; this writes the
    checkpoint there, so ``--ckpt_path last`` resumes exactly. The CLI then exits with status 143.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        checkpoint: Any = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None or checkpoint.dirpath is None:
            return
        trainer.save_checkpoint(Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt")
