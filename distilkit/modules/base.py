"""What every distillation module does alike, written once.

:class:`DistillationBase` is the base of :class:`~distilkit.DistillationModule`,
:class:`~distilkit.OnPolicyDistillationModule` and :class:`~distilkit.MutualDistillationModule`. A module
names the models it trains and scores (:meth:`DistillationBase.scorers`: the student, or each peer of a
cohort), and the base does the rest the same way for all:

- **evaluation and predict** through the training loss's own chunk loop, with an observer that updates each
  scored model's torchmetrics (``val/ppl`` ...; ``val/<domain>/ppl`` when the data carries domains,
  :mod:`distilkit.modules.domains`) or collects its per-position NLL;
- **knobs** a curriculum stage may set: the module's :attr:`knobs` and the loss's;
- **optimizers and schedulers** built from the factories a recipe gives, a schedule's length filled in from
  the run when left out (:mod:`distilkit.modules.schedules`);
- **callbacks** every run needs (the run state in checkpoints, the tokenizer check, the schedule check);
- **the head check**: models whose logits the chunked heads would not reproduce are refused once, before the
  first step;
- **the non-finite guard** (:class:`~distilkit.modules.guards.NonFiniteGuard`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from distilkit.batch import Batch, next_token_targets
from distilkit.data.token_bytes import token_byte_lengths
from distilkit.errors import ConfigError
from distilkit.losses import DistillationLoss
from distilkit.losses.chunked import ChunkObserver
from distilkit.metrics import EvaluationMetrics, NextTokenNLL
from distilkit.modules.domains import DomainMetrics
from distilkit.modules.guards import NonFiniteGuard, ScheduleLengthCheck
from distilkit.modules.schedules import build_scheduler
from distilkit.run import RunState, TokenizerCheck

#: A scored model's loss terms for one batch, given an observer of its chunks: ``observer -> {name: term}``.
Scorer = Callable[[ChunkObserver | None], dict[str, Tensor]]


class DistillationBase(L.LightningModule):
    """Base of the distillation modules (see the module docstring).

    A subclass sets ``loss``, ``chunk_size``, ``vocab_size`` and ``guard`` in its ``__init__``, calls
    :meth:`init_evaluation` with the number of models it scores, and implements :meth:`scorers` and
    :meth:`check_heads`.
    """

    #: Settings of the module a curriculum stage may change (the loss declares its own: ``loss.knobs``).
    knobs: ClassVar[tuple[str, ...]] = ()
    #: A resumed fit may go on with another teacher than its checkpoint's (``--allow_teacher_change true``;
    #: refused otherwise: :meth:`distilkit.run.RunState.check_teacher`).
    allow_teacher_change: bool = False

    loss: DistillationLoss
    chunk_size: int | None
    vocab_size: int
    guard: NonFiniteGuard

    def init_evaluation(self, scored: int) -> None:
        """Metrics for ``scored`` models at each evaluation stage."""
        self.eval_metrics = nn.ModuleDict(
            {stage: nn.ModuleList([EvaluationMetrics() for _ in range(scored)]) for stage in ("val", "test")}
        )
        self._heads_checked = False
        self.domain_metrics: nn.ModuleDict | None = None  # per evaluation stage, once the data has domains

    # ------------------------------------------------------------------------------------------ scoring
    def scorers(self, batch: Batch) -> dict[str, Scorer]:
        """The models this module scores on ``batch``, by name (``student``; ``peer0`` ...), each as a
        function of a chunk observer that returns its loss terms (``loss``, ``ce_loss`` ...)."""
        raise NotImplementedError

    def teaches_whole_distributions(self) -> bool:
        """Whether the chunks the scored models are compared with are the teacher's whole distributions (so
        ``teacher_ppl``, ``kl`` and the teacher's NLL can be computed from them)."""
        return True

    # --------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def evaluate(self, batch: Batch, stage: str) -> dict[str, dict[str, Tensor]]:
        """Every scored model's loss terms and metrics, from the logits of the training loss's chunk loop.

        One scored model logs ``{stage}/loss``, ``{stage}/ce_loss`` ... and ``{stage}/ppl`` ...; several log
        ``{stage}/{name}/...`` each (the subclass may add what spans them, see :meth:`evaluated`)."""
        scorers = self.scorers(batch)
        size = max(int(next_token_targets(batch["labels"])[0].sum()), 1)
        single = len(scorers) == 1
        results = {}
        for index, (name, score) in enumerate(scorers.items()):
            stage_metrics: Any = self.eval_metrics[stage]
            metrics: EvaluationMetrics = stage_metrics[index]
            observer = self.observer(stage, index, metrics)
            if single and self.domain_metrics is not None and "domain" in batch:
                observer = self._domains(stage).observer(batch, observer)
            losses = score(observer)
            prefix = f"{stage}/" if single else f"{stage}/{name}/"
            total = losses["loss"]
            self.log(f"{prefix}loss", total, prog_bar=single, batch_size=size, sync_dist=True)
            terms = {f"{prefix}{k}": v for k, v in losses.items() if k != "loss"}
            self.log_dict(terms, batch_size=size, sync_dist=True)
            with_teacher = "kd_loss" in losses
            for metric_name, metric in metrics.logged(with_teacher).items():
                self.log(f"{prefix}{metric_name}", metric, prog_bar=single and metric_name == "ppl")
            results[name] = losses
        self.evaluated(stage, results, size)
        return results

    def on_validation_epoch_end(self) -> None:
        """``val/<domain>/ppl`` ... when the data carries domains."""
        if self.domain_metrics is not None:
            self._domains("val").log(self, "val")

    def on_test_epoch_end(self) -> None:
        if self.domain_metrics is not None:
            self._domains("test").log(self, "test")

    def _domains(self, stage: str) -> DomainMetrics:
        assert self.domain_metrics is not None
        metrics: Any = self.domain_metrics[stage]
        return metrics

    def observer(self, stage: str, index: int, metrics: EvaluationMetrics) -> ChunkObserver:
        """What sees the chunks of scored model ``index`` in evaluation: its metrics."""
        return metrics.observe

    def evaluated(self, stage: str, results: Mapping[str, Mapping[str, Tensor]], size: int) -> None:
        """Called after every scored model of a batch was evaluated (a cohort logs its means here)."""

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Per-position NLL of the next token of every scored model (and of the teacher, when its whole
        distribution is known), ``{name: (B, T-1)}``, NaN where no token is predicted;
        :class:`~distilkit.callbacks.PredictionWriter` turns them into per-document columns."""
        keep, _ = next_token_targets(batch["labels"])  # (B, T-1)
        scorers = self.scorers(batch)
        result: dict[str, Tensor] = {}
        for name, score in scorers.items():
            with_teacher = len(scorers) == 1 and self.teaches_whole_distributions()
            nll = NextTokenNLL(keep, with_teacher=with_teacher, name=name)
            score(nll.observe)
            result |= nll.result()
        return result

    # -------------------------------------------------------------------------------------------- knobs
    def knob_names(self) -> set[str]:
        """What a curriculum stage may set: the module's :attr:`knobs` and the loss's declared ``knobs``."""
        return set(self.knobs) | set(self.loss.knobs)

    def knob_fix(self, unknown: Iterable[str]) -> str:
        """The fix for knobs ``unknown`` that a stage names and this module lacks."""
        return f"use one of {sorted(self.knob_names())} (the knobs {type(self).__name__} declares)"

    def apply_knobs(self, knobs: Mapping[str, float]) -> None:
        """Set knobs between steps (a curriculum stage does); each is validated where it lands."""
        for name, value in knobs.items():
            if not self.set_knob(name, value):
                raise ConfigError(
                    f"stage knob {name}",
                    value,
                    f"is not a knob of {type(self).__name__}",
                    self.knob_fix([name]),
                )

    def knob_state(self) -> dict[str, Any]:
        """Every knob's current setting, for :meth:`load_knob_state` (a curriculum tries its stages' values
        before the first step, then puts these back)."""
        return {
            "module": {name: getattr(self, name) for name in self.knobs},
            "loss": {name: getattr(self.loss, name) for name in self.loss.knobs},
        }

    def load_knob_state(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`knob_state` returned."""
        for name, value in state["module"].items():
            setattr(self, name, value)
        for name, value in state["loss"].items():
            self.loss.set_knob(name, value)

    def set_knob(self, name: str, value: float) -> bool:
        """Set one knob (its setter validates the value); False when ``name`` is not a knob here."""
        if name in self.knobs:
            setattr(self, name, value)
        elif name in self.loss.knobs:
            self.loss.set_knob(name, value)
        else:
            return False
        return True

    # ---------------------------------------------------------------------------------------- optimizers
    def optimizer_and_scheduler(
        self,
        optimizer_factory: Callable[..., Any],
        scheduler_factory: Any,
        parameters: Iterable[nn.Parameter],
    ) -> tuple[Any, Any]:
        """An optimizer of ``parameters`` and its scheduler (None without a factory); a schedule given no
        length lasts the run (:func:`~distilkit.modules.schedules.build_scheduler`)."""
        optimizer = optimizer_factory(list(parameters))
        if scheduler_factory is None:
            return optimizer, None
        return optimizer, build_scheduler(
            scheduler_factory, optimizer, self.trainer.estimated_stepping_batches
        )

    # ----------------------------------------------------------------------------------------- callbacks
    def configure_callbacks(self) -> list[L.Callback]:
        """What export and resume need (:class:`~distilkit.run.RunState`), the data's tokenizer checked
        against the models', and each schedule's length against the run's."""
        return [RunState(), TokenizerCheck(), ScheduleLengthCheck()]

    # -------------------------------------------------------------------------------------- head check
    def check_heads(self) -> None:
        """Refuse, with a ConfigError, a model whose logits its chunked head would not reproduce."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        """The head check, once, before any step (only the chunked path relies on the heads), and the byte
        lengths of the data's tokens for ``bpb``."""
        if not self._heads_checked and self.chunk_size is not None:
            self.check_heads()
            self._heads_checked = True
        data = getattr(self._trainer, "datamodule", None)
        names = list(getattr(data, "domain_names", None) or [])
        if names and (self.domain_metrics is None or self._domains("val").names != names):
            stages = {stage: DomainMetrics(names) for stage in ("val", "test")}
            self.domain_metrics = nn.ModuleDict(stages).to(self.device)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            lengths = torch.as_tensor(token_byte_lengths(tokenizer))
            for metrics in self.eval_metrics.modules():
                if isinstance(metrics, EvaluationMetrics):
                    metrics.set_token_bytes(lengths)

    def on_validation_start(self) -> None:
        DistillationBase.on_fit_start(self)

    on_test_start = on_predict_start = on_validation_start
