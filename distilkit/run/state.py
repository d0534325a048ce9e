"""What a distilkit checkpoint carries for the run, besides the weights: one callback, one dict.

:class:`RunState` writes ``checkpoint["distilkit"]`` (the schema is
:class:`~distilkit.models.checkpoint.CheckpointExtras`) and reads it back when a fit resumes. The
distillation modules add it themselves (``configure_callbacks``), so checkpoints written from Python are as
complete as the CLI's.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from distilkit.data.tokenizer import tokenizer_files
from distilkit.errors import ConfigError, TrainingStopped
from distilkit.models.adapters import adapter_record
from distilkit.models.checkpoint import CheckpointExtras
from distilkit.models.sharding import all_finite
from distilkit.run.lightning_internals import (
    log_pending_step,
    run_validation_now,
    validation_skipped_by_resume,
)
from distilkit.run.loggers import rewind_csv_loggers, wandb_loggers
from distilkit.teachers import TeacherSource, describe_teacher, same_teacher

KEY = "distilkit"


class DistillationRun(Protocol):
    """What :class:`RunState` needs of the module: its vocabulary width and the models ``export`` writes."""

    vocab_size: int

    def exportable_models(self) -> dict[str, Any]: ...


class RunState(Callback):
    """Keeps ``checkpoint["distilkit"]``: the exportable models' configs, the run's tokenizer, the random
    state and the W&B run id; and on save, first writes the finishing step's log row (a kill right after
    the save would lose it otherwise) and refuses to checkpoint non-finite weights.

    On a resumed fit it restores the random state (dropout masks continue as they would have), drops the
    ``metrics.csv`` rows the interrupted run logged past the checkpoint (they are logged again), and runs the
    validation that was due at the checkpoint's step when the checkpoint came before it.
    """

    def __init__(self) -> None:
        self._tokenizer_files: tuple[Any, dict[str, str]] | None = None  # serialised once per run
        self.earlier_teachers: list[dict[str, Any]] = []  # teachers changed on purpose: until_step, teacher

    @property
    def state_key(self) -> str:
        return "RunState"

    def extras(self, trainer: L.Trainer, module: DistillationRun) -> CheckpointExtras:
        """The whole ``checkpoint["distilkit"]`` dict for the current state of the run."""
        extras: CheckpointExtras = {
            "vocab_size": int(module.vocab_size),
            "models": {
                prefix: model.config.to_dict()
                for prefix, model in module.exportable_models().items()
                if getattr(model, "config", None) is not None
            },
            "rng": random_state(),
        }
        adapters = {
            p: r for p, m in module.exportable_models().items() if (r := adapter_record(m)) is not None
        }
        if adapters:
            extras["adapters"] = adapters  # LoRA students: what rebuilds and checks their frozen base
        extras["teacher"] = teacher_identity(module)  # what taught the run (None: no teacher)
        if self.earlier_teachers:
            extras["earlier_teachers"] = self.earlier_teachers
        files = self._tokenizer(trainer)
        if files:
            extras["tokenizer_files"] = files
        wandb_ids = [str(logger.version) for logger in wandb_loggers(trainer)]
        if wandb_ids:
            extras["wandb_run_id"] = wandb_ids[0]  # a resumed fit continues this W&B run
        return extras

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        weights = [p for model in pl_module.exportable_models().values() for p in model.parameters()]
        if not all_finite(weights):
            raise TrainingStopped(
                f"step {trainer.global_step}: the student has non-finite weights; no checkpoint was written. "
                "Resume from the last good checkpoint with a lower learning rate."
            )
        log_pending_step(trainer)
        checkpoint[KEY] = self.extras(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """A fit resumed from a checkpoint written before a validation that was due runs that validation
        first (Lightning would skip it: its log row and a curriculum's plateau check would be lost)."""
        if validation_skipped_by_resume(trainer):
            rewind_csv_loggers(trainer, trainer.global_step, evaluations_at_last=False)
            run_validation_now(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        extras = checkpoint.get(KEY) or {}
        if trainer.state.fn == "fit":
            self.check_teacher(pl_module, extras, int(checkpoint.get("global_step", 0)))
            rewind_csv_loggers(trainer, int(checkpoint.get("global_step", 0)))
        rng = extras.get("rng")
        if rng:
            restore_random_state(rng)

    def check_teacher(self, pl_module: Any, extras: dict[str, Any], step: int) -> None:
        """A resumed fit goes on with the teacher the checkpoint was trained by: another one (other weights,
        another cache's targets, one where there was none) is refused in one line, unless the module's
        ``allow_teacher_change`` is set (``--allow_teacher_change true``); then the change is said and
        recorded (``earlier_teachers``). Checkpoints written before teachers were recorded are not checked."""
        self.earlier_teachers = list(extras.get("earlier_teachers") or [])
        if "teacher" not in extras:
            return
        recorded, current = extras["teacher"], teacher_identity(pl_module)
        if same_teacher(recorded, current):
            return
        source = getattr(pl_module, "teacher_source", None)
        field = getattr(source, "field", "model.teacher")
        if not getattr(pl_module, "allow_teacher_change", False):
            raise ConfigError(
                field,
                describe_teacher(current),
                f"is not the teacher this run was trained by up to step {step}: {describe_teacher(recorded)}",
                "resume with that teacher, or pass --allow_teacher_change true to change teacher on purpose",
            )
        rank_zero_info(
            f"teacher changed at step {step}: {describe_teacher(recorded)} -> {describe_teacher(current)}"
        )
        self.earlier_teachers.append({"until_step": step, "teacher": recorded})

    def _tokenizer(self, trainer: L.Trainer) -> dict[str, str]:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            return {}
        if self._tokenizer_files is None or self._tokenizer_files[0] is not tokenizer:
            self._tokenizer_files = (tokenizer, tokenizer_files(tokenizer))
        return self._tokenizer_files[1]


def teacher_identity(module: Any) -> dict[str, Any] | None:
    """What teaches ``module``: its teacher source's identity, or None (no teacher; a cohort's peers, which
    teach each other, are in the checkpoint themselves)."""
    source = getattr(module, "teacher_source", None)
    return source.identity() if isinstance(source, TeacherSource) else None


def random_state() -> dict[str, Any]:
    """The torch, Python and CUDA random states, in types ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(state: Any) -> Any:
    """Python's random state as lists and ints (tuples do not survive ``weights_only`` loading)."""
    return [_plain(x) for x in state] if isinstance(state, tuple) else state
