"""CurriculumCallback: staged learning rates that advance on schedule or on a plateau, and roll back a
stage that makes the model worse.

A run is a list of :class:`Stage` s. Each has its own learning rate (absolute, or a multiple of the
optimizer's), a length (steps, epochs, tokens, or until a monitored metric stops improving), an optional
warm-up and in-stage anneal, and optional values for the distillation knobs that the module declares
(:meth:`DistillationModule.knob_names`: ``kd_ratio`` and the loss's own, such as ``temperature`` or
``beta``), which :meth:`DistillationModule.apply_knobs` sets when the stage starts.

The callback owns the learning rate: it sets every parameter group's ``lr`` of every optimizer before each
optimizer step, so a trainer LR scheduler would fight it and is refused. A stage's ``lr`` sets every group
to that rate; its ``lr_scale`` scales each group's own configured rate, so models with their own optimizers
and rates (a mutual cohort's peers) keep their ratios. When the last stage ends, training stops.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from distilkit.errors import ConfigError


@runtime_checkable
class Tunable(Protocol):
    """A module with knobs a stage may set: it declares their names and validates the values it is given
    (:class:`~distilkit.DistillationModule` is one). A module without knobs accepts stages without knobs."""

    def knob_names(self) -> set[str]: ...

    def apply_knobs(self, knobs: Mapping[str, float]) -> None: ...


@runtime_checkable
class ExplainsKnobs(Tunable, Protocol):
    """A :class:`Tunable` module that says how to mend knobs a stage names and it lacks (a routed run's
    ``mix.NAME``: only mixed teachers have them)."""

    def knob_fix(self, unknown: Iterable[str]) -> str: ...


@runtime_checkable
class KnobState(Tunable, Protocol):
    """A :class:`Tunable` module whose knob settings can be read and put back, so the callback tries every
    stage's values, in order, before the first step (:class:`~distilkit.DistillationModule` is one)."""

    def knob_state(self) -> Any: ...

    def load_knob_state(self, state: Any) -> None: ...


Anneal = Literal["constant", "linear", "cosine"]
Action = Literal["continue", "advance", "rollback"]


@dataclass
class Stage:
    """One stage of a curriculum.

    Attributes:
        name: shown in logs and on the learning-curve plot.
        lr: absolute learning rate; or
        lr_scale: multiple of the optimizer's configured learning rate (default 1.0 when neither is set).
        steps / epochs / tokens: the stage's length, in optimizer steps, epochs or training tokens; or
        until: ``"plateau"``: until the callback's ``monitor`` has not improved by ``min_delta`` for
            ``patience`` validation checks, or ``max_steps`` have passed.
        warmup_steps: linear warm-up from 0 to the stage's rate over its first steps.
        anneal: ``constant``, ``linear`` or ``cosine`` decay to 0 over the stage's length in steps
            (for ``until`` stages, over ``max_steps``).
        knobs: distillation knobs set when the stage starts, e.g. ``{kd_ratio: 0.9, temperature: 2.0}``.
    """

    name: str
    lr: float | None = None
    lr_scale: float | None = None
    steps: int | None = None
    epochs: int | None = None
    tokens: int | None = None
    until: Literal["plateau"] | None = None
    patience: int = 2
    min_delta: float = 0.0
    max_steps: int | None = None
    warmup_steps: int = 0
    anneal: Anneal = "constant"
    knobs: dict[str, float] = field(default_factory=dict)


@dataclass
class CurriculumState:
    """Where a curriculum is: the stage and what it has seen since the stage (re)started.

    Attributes:
        stage: index of the running stage.
        start_step: the optimizer step at which the stage (or its retry) started.
        start_value / best_value: the monitored metric when the stage started, and its best since.
        bad_checks: validations in a row without an improvement by ``min_delta``.
        tokens / epochs: training tokens and epochs since the stage started.
        retries: rollbacks of this stage so far.
        lr_factor: the product of the back-offs applied to the stage's rate.
        tokens_per_step: tokens an optimizer step trains on (measured on the first batch).
        knobs: the knobs the stage set.
        settings: every knob's setting once the stage's were applied (the module's ``knob_state``): what
            the stages so far set, which a resumed run puts back (None: a module without knob state).
        finished: the last stage has ended.
    """

    stage: int = 0
    start_step: int = 0
    start_value: float | None = None
    best_value: float | None = None
    bad_checks: int = 0
    tokens: int = 0
    epochs: int = 0
    retries: int = 0
    lr_factor: float = 1.0
    tokens_per_step: int = 0
    knobs: dict[str, float] = field(default_factory=dict)
    settings: Any = None
    finished: bool = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CurriculumState:
        """The state a checkpoint holds (keys it does not know are refused by the dataclass)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


def scheduled_lr(base: float, step: int, warmup: int, horizon: int | None, anneal: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a stage.

    Linear warm-up ``base·(step+1)/warmup`` for ``step < warmup``; then constant, or a decay over the
    remaining ``horizon − warmup`` steps: linear ``base·(1 − f)``, cosine ``base·½(1 + cos πf)``, with f the
    fraction of the decay done.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    if anneal == "constant" or not horizon:
        return base
    done = min(1.0, (step - warmup) / max(1, horizon - warmup))
    if anneal == "linear":
        return base * (1.0 - done)
    return base * 0.5 * (1.0 + math.cos(math.pi * done))


def _check_stage(index: int, stage: Stage) -> None:
    where = f"stages[{index}] ({stage.name})"
    lengths = [n for n in ("steps", "epochs", "tokens", "until") if getattr(stage, n) is not None]
    if not lengths:
        raise ConfigError(
            where, "no length", "needs a length", "set one of steps, epochs, tokens or until: plateau"
        )
    if len(lengths) > 1:
        raise ConfigError(where, lengths, "has more than one length", "keep exactly one")
    if stage.lr is not None and stage.lr_scale is not None:
        raise ConfigError(
            where, {"lr": stage.lr, "lr_scale": stage.lr_scale}, "sets both lr and lr_scale", "keep one"
        )
    for name in (
        "lr",
        "lr_scale",
        "steps",
        "epochs",
        "tokens",
        "max_steps",
        "warmup_steps",
        "patience",
        "min_delta",
    ):
        value = getattr(stage, name)
        if value is not None and value < 0:
            raise ConfigError(f"{where}.{name}", value, "is negative", "use a value >= 0")
    for name in ("steps", "epochs", "tokens"):
        if getattr(stage, name) == 0:
            raise ConfigError(f"{where}.{name}", 0, "is zero", "use a positive length")
    if stage.anneal not in ("constant", "linear", "cosine"):
        raise ConfigError(
            f"{where}.anneal", stage.anneal, "is not an anneal", "use constant, linear or cosine"
        )
    for name, value in stage.knobs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}.knobs.{name}", value, "is not a number", "give knobs numeric values")


class CurriculumCallback(Callback):
    """Run training as a sequence of :class:`Stage` s (see the module docstring).

    When a stage goes badly — a validation of ``monitor`` ends worse than the stage's starting value by
    more than ``tolerance``, or a training loss is not finite — ``on_regression`` decides: ``continue``;
    ``advance``: restore the student and optimizer state kept at the stage's best validation and go on
    to the next stage; or ``rollback``: restore that state, multiply the stage's rate by ``lr_backoff``
    and run the stage again, at most ``max_retries`` times, then advance. (The best point is a CPU copy
    of the trainable state, kept in memory and in checkpoints; ``continue`` keeps none.)

    Logs ``curriculum/stage`` (index), ``curriculum/lr`` (the first parameter group's),
    ``curriculum/retries`` and ``curriculum/<knob>``.

    Args:
        stages: the stages, run in order.
        monitor: validation metric for plateaus and regressions (default ``val/ce_loss``: unlike
            ``val/loss`` it does not move when a stage changes ``kd_ratio``).
        mode: ``min`` or ``max``: which direction of ``monitor`` is better.
        on_regression: ``continue``, ``advance`` or ``rollback``.
        tolerance: how much worse than the stage's start counts as a regression.
        lr_backoff: factor on the stage's rate at each rollback (default 0.5).
        max_retries: rollbacks per stage before advancing instead.
    """

    def __init__(
        self,
        stages: list[Stage],
        monitor: str = "val/ce_loss",
        mode: Literal["min", "max"] = "min",
        on_regression: Action = "rollback",
        tolerance: float = 0.0,
        lr_backoff: float = 0.5,
        max_retries: int = 2,
    ) -> None:
        if not stages:
            raise ConfigError("curriculum.stages", stages, "is empty", "give at least one stage")
        stages = [Stage(**s) if isinstance(s, dict) else s for s in stages]
        for index, stage in enumerate(stages):
            _check_stage(index, stage)
        if mode not in ("min", "max"):
            raise ConfigError("curriculum.mode", mode, "is not a mode", "use min or max")
        if on_regression not in ("continue", "advance", "rollback"):
            raise ConfigError(
                "curriculum.on_regression",
                on_regression,
                "is not an action",
                "use continue, advance or rollback",
            )
        if not 0 < lr_backoff <= 1:
            raise ConfigError("curriculum.lr_backoff", lr_backoff, "must lie in (0, 1]", "use e.g. 0.5")
        if tolerance < 0 or max_retries < 0:
            raise ConfigError(
                "curriculum.tolerance/max_retries", (tolerance, max_retries), "is negative", "use values >= 0"
            )
        self.stages, self.monitor, self.mode = stages, monitor, mode
        self.on_regression, self.tolerance = on_regression, tolerance
        self.lr_backoff, self.max_retries = lr_backoff, max_retries
        self.state = CurriculumState()
        self.base_lrs: list[float] = []
        self.best_point: dict[str, Any] | None = None  # student + optimizer state at the stage's best

    # ------------------------------------------------------------------------------------------ the plan
    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    @property
    def stage(self) -> Stage:
        return self.stages[self.state.stage]

    def stage_horizon(self, trainer: L.Trainer) -> int | None:
        """The current stage's length in optimizer steps, when known in advance."""
        stage = self.stage
        if stage.steps is not None:
            return stage.steps
        if stage.epochs is not None:
            return stage.epochs * max(1, int(trainer.num_training_batches) // trainer.accumulate_grad_batches)
        if stage.tokens is not None and self.state.tokens_per_step:
            return math.ceil(stage.tokens / self.state.tokens_per_step)
        return stage.max_steps

    def current_lrs(self, trainer: L.Trainer) -> list[float]:
        """The rate of each parameter group for the next optimizer step."""
        stage = self.stage
        step = trainer.global_step - self.state.start_step
        scale = self.state.lr_factor
        bases = [stage.lr if stage.lr is not None else (stage.lr_scale or 1.0) * b for b in self.base_lrs]
        horizon = self.stage_horizon(trainer)
        return [scheduled_lr(b * scale, step, stage.warmup_steps, horizon, stage.anneal) for b in bases]

    # ----------------------------------------------------------------------------------------- training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ConfigError(
                "model.lr_scheduler",
                type(trainer.lr_scheduler_configs[0].scheduler).__name__,
                "would fight the CurriculumCallback, which sets the learning rate itself",
                "remove the LR scheduler (put warm-up and anneal in the stages)",
            )
        if not self.base_lrs:
            self.base_lrs = [group.get("initial_lr", group["lr"]) for group in _param_groups(trainer)]
        known = pl_module.knob_names() if isinstance(pl_module, Tunable) else set()
        for index, stage in enumerate(self.stages):
            unknown = set(stage.knobs) - known
            if unknown:
                name = type(pl_module).__name__
                declared = f"use one of {sorted(known)} (the knobs {name} declares)"
                fix = declared if known else f"drop them ({name} has none)"
                raise ConfigError(
                    f"stages[{index}].knobs",
                    sorted(unknown),
                    f"are not knobs of {name}",
                    pl_module.knob_fix(unknown) if isinstance(pl_module, ExplainsKnobs) else fix,
                )
        if isinstance(pl_module, KnobState):
            if self.state.settings is not None:  # resumed: what the stages so far set, not only this one
                pl_module.load_knob_state(self.state.settings)
            self._try_stages(pl_module)
        self._start_stage(trainer, pl_module, resumed=True)

    def _try_stages(self, pl_module: Any) -> None:
        """Apply the knobs of every stage still to run, in order, and put the settings back: a value the
        module refuses (a weight below 0, a ratio above 1, every mixture weight 0) stops the run before its
        first training step, not when its stage starts hours in."""
        state = pl_module.knob_state()
        try:
            for index in range(self.state.stage, len(self.stages)):
                stage = self.stages[index]
                try:
                    pl_module.apply_knobs(stage.knobs)
                except ConfigError as err:
                    raise ConfigError(
                        f"stages[{index}] ({stage.name}).knobs", dict(stage.knobs),
                        f"{err.field}={err.value!r} {err.problem}", err.fix,
                    ) from None  # fmt: skip
        finally:
            pl_module.load_knob_state(state)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if "input_ids" in batch and not self.state.tokens_per_step:
            self.state.tokens_per_step = int(batch["input_ids"].numel()) * trainer.accumulate_grad_batches
        for group, lr in zip(_param_groups(trainer), self.current_lrs(trainer), strict=True):
            group["lr"] = lr

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.state.tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        size = int(batch["input_ids"].shape[0]) if "input_ids" in batch else 1
        pl_module.log("curriculum/stage", float(self.state.stage), batch_size=size, prog_bar=True)
        values = {
            "curriculum/retries": float(self.state.retries),
            "curriculum/lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
        }
        values.update({f"curriculum/{k}": float(v) for k, v in self.state.knobs.items()})
        pl_module.log_dict(values, batch_size=size)
        if loss is not None and not torch.isfinite(loss).all():
            self._regressed(trainer, pl_module, f"non-finite training loss at step {trainer.global_step}")
            return
        stage, steps = self.stage, trainer.global_step - self.state.start_step
        done_steps = stage.steps is not None and steps >= stage.steps
        done_tokens = stage.tokens is not None and self.state.tokens >= stage.tokens
        done_cap = stage.until is not None and stage.max_steps is not None and steps >= stage.max_steps
        if done_steps or done_tokens or done_cap:
            self._advance(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state.epochs += 1
        if self.stage.epochs is not None and self.state.epochs >= self.stage.epochs:
            self._advance(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        state = self.state
        if state.start_value is None:
            state.start_value = value
        if state.best_value is None or self._better(value, state.best_value, self.stage.min_delta):
            state.best_value, state.bad_checks = value, 0
            self._keep_best_point(trainer, pl_module)
        else:
            state.bad_checks += 1
        if self._worse(value, state.start_value, self.tolerance) or not math.isfinite(value):
            self._regressed(
                trainer, pl_module, f"{self.monitor}={value:.4g} vs {state.start_value:.4g} at the start"
            )
        elif self.stage.until == "plateau" and state.bad_checks >= self.stage.patience:
            self._advance(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- moves
    def _better(self, value: float, reference: float, margin: float) -> bool:
        return value < reference - margin if self.mode == "min" else value > reference + margin

    def _worse(self, value: float, reference: float, margin: float) -> bool:
        return value > reference + margin if self.mode == "min" else value < reference - margin

    def _regressed(self, trainer: L.Trainer, pl_module: L.LightningModule, why: str) -> None:
        if self.on_regression == "continue":
            return
        if self.on_regression == "advance" or self.state.retries >= self.max_retries:
            self._restore_best_point(trainer, pl_module)
            self._advance(trainer, pl_module)
            return
        self._restore_best_point(trainer, pl_module)
        retries, factor = self.state.retries + 1, self.state.lr_factor * self.lr_backoff
        self.state = CurriculumState(
            stage=self.state.stage,
            start_step=trainer.global_step,
            start_value=self.state.best_value,
            best_value=self.state.best_value,
            retries=retries,
            lr_factor=factor,
            tokens_per_step=self.state.tokens_per_step,
        )
        self._start_stage(trainer, pl_module)

    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_value = self.state.best_value if self.state.best_value is not None else self.state.start_value
        if self.state.stage + 1 >= len(self.stages):
            trainer.should_stop = True
            self.state.finished = True
            return
        self.state = CurriculumState(
            stage=self.state.stage + 1,
            start_step=trainer.global_step,
            start_value=last_value,
            best_value=last_value,
            tokens_per_step=self.state.tokens_per_step,
        )
        self._start_stage(trainer, pl_module)

    def _start_stage(self, trainer: L.Trainer, pl_module: L.LightningModule, resumed: bool = False) -> None:
        knobs = self.stage.knobs
        restored = resumed and self.state.settings is not None  # put back in on_train_start
        if knobs and isinstance(pl_module, Tunable) and not restored:
            pl_module.apply_knobs(knobs)
        self.state.knobs = dict(knobs)
        if isinstance(pl_module, KnobState):
            self.state.settings = pl_module.knob_state()
        if not resumed or self.best_point is None:
            self._keep_best_point(trainer, pl_module)

    def _keep_best_point(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_regression == "continue":
            return
        self.best_point = {
            "module": {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()},
            "optimizers": [_to_cpu(copy.deepcopy(opt.state_dict())) for opt in trainer.optimizers],
        }

    def _restore_best_point(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_point is None:
            return
        pl_module.load_state_dict(self.best_point["module"])
        saved = self.best_point.get("optimizers") or [self.best_point["optimizer"]]  # one, before 0.2
        for optimizer, state in zip(trainer.optimizers, saved, strict=True):
            optimizer.load_state_dict(state)

    # -------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.state_dict(),
            "base_lrs": list(self.base_lrs),
            "best_point": self.best_point,
            "stages": [asdict(s) for s in self.stages],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [Stage(**s) for s in state_dict.get("stages", [])]
        if saved and [asdict(s) for s in saved] != [asdict(s) for s in self.stages]:
            raise ConfigError(
                "curriculum.stages",
                "changed",
                "differ from the checkpoint's stages",
                "resume with the stages the run started with",
            )
        self.state = CurriculumState.from_state_dict(state_dict["state"])
        self.base_lrs = list(state_dict["base_lrs"])
        self.best_point = state_dict.get("best_point")


def _param_groups(trainer: L.Trainer) -> list[dict[str, Any]]:
    """Every parameter group of every optimizer, in order."""
    return [group for optimizer in trainer.optimizers for group in optimizer.param_groups]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
