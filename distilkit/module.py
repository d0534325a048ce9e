"""DistillationModule: a trainable student, a frozen teacher and a pluggable loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from distilkit.batch import Batch, model_inputs, next_token_targets
from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.errors import ConfigError, check_range
from distilkit.guards import NonFiniteGuard, ScheduleLengthCheck
from distilkit.losses import DistillationLoss, ForwardKLLoss, HiddenStateLoss, chunked
from distilkit.losses.closed_form import CrossEntropyAndForwardKL
from distilkit.losses.compiled import CompiledTerms
from distilkit.metrics import EvaluationMetrics, NextTokenNLL
from distilkit.models.checkpoint import check_models_match
from distilkit.models.heads import BodyOutput, OutputHead, body_features, check_head, output_head
from distilkit.models.loading import ModelSpec
from distilkit.models.sharding import ShardedTraining
from distilkit.models.student_hooks import StudentHooks
from distilkit.run import CachedTeacher, RunState, TokenizerCheck


class DistillationModule(ShardedTraining, StudentHooks, L.LightningModule):  # type: ignore[misc]
    """Distil a frozen teacher into a student: total = (1 − kd_ratio)·CE + kd_ratio·KD.

    CE is the student's next-token cross-entropy on the labels; KD is ``loss(student, teacher)`` on the
    same positions; an optional ``hidden_loss`` adds its weighted intermediate-layer term. CE and KD come
    from the final hidden states through each model's output head in chunks of ``chunk_size`` tokens, so the
    full ``(tokens, V)`` logits are never held. Without a teacher the module is plain language-model
    training (total = CE), used to pretrain teachers and baselines.

    The teacher is frozen, kept in eval mode, run under ``torch.no_grad()``, left out of the optimizer and
    never written into a checkpoint. Under Lightning's ``ModelParallelStrategy`` both are sharded with FSDP2
    (:class:`~distilkit.models.sharding.ShardedTraining`). What a checkpoint carries besides the weights
    (tokenizer, random state, configs for export) is kept by :class:`~distilkit.run.RunState`, which the
    module adds to its trainer. Students cut from the teacher or trained through LoRA adapters are
    handled by :class:`~distilkit.models.student_hooks.StudentHooks`.
    Extend by overriding the small pieces: :meth:`student_forward`, :meth:`teacher_forward`,
    :meth:`compute_loss`, :meth:`loss_terms` and :meth:`loss_weights`.

    Args:
        student: a Hugging Face model directory or hub name, a config mapping (random init), a module, or
            ``{from_teacher: {...}}``: cut from the teacher (:mod:`distilkit.models.from_teacher`).
        teacher: the same forms, or None for training without a teacher (or from ``teacher_cache``).
        teacher_cache: a directory written by ``distilkit cache``, to train from instead of a teacher.
        loss: the KD divergence (default ``ForwardKLLoss(temperature=1.0)``).
        hidden_loss: optional intermediate-layer loss, added as ``hidden_loss.weight · term``; its
            projections train with the student and are never exported.
        kd_ratio: weight of KD in the total, in [0, 1] (default 0.5).
        chunk_size: tokens per chunk of the loss; ``"auto"`` chooses it from a byte budget; None forms the
            full logits at once (the reference path).
        teacher_dtype: dtype to load the teacher in (``"bfloat16"`` halves its memory). The student is
            always float32; mixed precision is the trainer's ``precision`` setting.
        compile_loss: compile :meth:`loss_terms` with ``torch.compile`` (the first run on a machine pays the
            compilation). Off (default): CE and forward KL take their gradient in closed form, the fast path.
        nonfinite: what a non-finite loss term or gradient does: ``stop`` training with a message naming
            the step and the term, or ``skip`` the update (counted as ``train/nonfinite_skips``).
        max_nonfinite_skips: with ``skip``, stop after this many skipped steps in a row.
        optimizer: builds the optimizer from the trainable parameters (the student's, plus any of the loss).
        lr_scheduler: builds an LR scheduler from the optimizer; stepped every optimizer step.
        vocab_size: the tokenizer's size: fills config mappings and settles padded vocabularies. Linked
            from the data module by the CLI.
        block_size: context length; fills the positions of config mappings. Linked from the data module.
        eos_token_id: fills the bos/eos ids of config mappings. Linked from the data module.
        student_adapter: train a pretrained student through LoRA adapters, ``{r, alpha, target_modules,
            dropout}`` (:mod:`distilkit.models.adapters`): only they train and are checkpointed.
    """

    #: Settings of the module a curriculum stage may change (the loss declares its own: ``loss.knobs``).
    knobs: ClassVar[tuple[str, ...]] = ("kd_ratio",)

    def __init__(
        self,
        student: ModelSpec,
        teacher: ModelSpec | None = None,
        teacher_cache: str | None = None,
        loss: DistillationLoss | None = None,
        hidden_loss: HiddenStateLoss | None = None,
        kd_ratio: float = 0.5,
        chunk_size: int | Literal["auto"] | None = "auto",
        teacher_dtype: str = "float32",
        compile_loss: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_nonfinite_skips: int = 8,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        vocab_size: int | None = None,
        block_size: int | None = None,
        eos_token_id: int | None = None,
        student_adapter: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        modules = [
            name for name, spec in (("student", student), ("teacher", teacher)) if isinstance(spec, nn.Module)
        ]
        self.save_hyperparameters(ignore=["loss", "hidden_loss", "optimizer", "lr_scheduler", *modules])
        self.kd_ratio = kd_ratio
        self.guard = NonFiniteGuard(nonfinite, max_nonfinite_skips)
        self.load_models(
            student, teacher, student_adapter, teacher_dtype=teacher_dtype, vocab_size=vocab_size,
            block_size=block_size, eos_token_id=eos_token_id,
        )  # fmt: skip
        self.chunk_size = chunked.resolve_chunk_size(chunk_size, self.vocab_size)
        self.loss = loss if loss is not None else ForwardKLLoss()
        self.cached_teacher = CachedTeacher.open(teacher_cache, teacher, self.loss)
        self.hidden_loss = hidden_loss
        if hidden_loss is not None:
            hidden_loss.bind_models(self.student, self.teacher)
        self._terms = CompiledTerms(self.loss_terms) if compile_loss else self.loss_terms
        own_terms = type(self).loss_terms is DistillationModule.loss_terms  # a subclass's terms take autograd
        self._closed_form = CrossEntropyAndForwardKL(self.loss) if own_terms and not compile_loss else None
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.eval_metrics = nn.ModuleDict({stage: EvaluationMetrics() for stage in ("val", "test")})
        self._heads_checked = False

    @property
    def kd_ratio(self) -> float:
        return self._kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        self._kd_ratio = check_range("model.kd_ratio", value, 0.0, 1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Student logits ``(B, T, V)`` for ``(B, T)`` token ids."""
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.student_head()(self.student_forward({"input_ids": input_ids} | mask).last)

    # ----------------------------------------------------------------------------------------------- pieces
    def student_forward(self, batch: Batch) -> BodyOutput:
        """The student's final hidden states ``(B, T, H_s)`` (its logits for a module without a head),
        plus every layer's when a ``hidden_loss`` needs them."""
        hidden = self.hidden_loss is not None
        return body_features(self.student, **model_inputs(batch), output_hidden_states=hidden)

    def teacher_forward(self, batch: Batch) -> BodyOutput | None:
        """The teacher's :class:`BodyOutput` under no_grad, or None without a teacher."""
        if self.teacher is None:
            return None
        with torch.no_grad():
            hidden = self.hidden_loss is not None
            return body_features(self.teacher, **model_inputs(batch), output_hidden_states=hidden)

    def student_head(self) -> OutputHead:
        return output_head(self.student, self.vocab_size)

    def teacher_head(self) -> OutputHead | None:
        return None if self.teacher is None else output_head(self.teacher, self.vocab_size)

    def loss_terms(
        self, student_logits: Tensor, teacher: chunked.TeacherChunk, labels: Tensor
    ) -> dict[str, Tensor]:
        """Named loss terms, each a mean over the given positions.

        Args:
            student_logits: ``(N, V)`` at valid positions (one chunk of them).
            teacher: the teacher's ``(N, V)`` logits, its sparse targets (a teacher cache: KD and CE come
                from one softmax), or None without a teacher.
            labels: ``(N,)`` next-token targets.
        """
        if isinstance(teacher, SparseTargets):
            kd, ce = self.loss.sparse_forward_and_ce(student_logits, teacher, labels)
            return {"ce_loss": ce, "kd_loss": kd}
        count = max(labels.numel(), 1)
        terms = {"ce_loss": F.cross_entropy(student_logits.float(), labels, reduction="sum") / count}
        if teacher is not None:
            terms["kd_loss"] = self.loss(student_logits, teacher)
        return terms

    def loss_weights(self) -> dict[str, float]:
        """Weight of each term of :meth:`loss_terms` in the total (its keys name the terms)."""
        if self.teacher is None and self.cached_teacher is None:
            return {"ce_loss": 1.0}
        return {"ce_loss": 1.0 - self.kd_ratio, "kd_loss": self.kd_ratio}

    def knob_names(self) -> set[str]:
        """What a curriculum stage may set: the module's :attr:`knobs` and the loss's declared ``knobs``."""
        return set(self.knobs) | set(self.loss.knobs)

    def apply_knobs(self, knobs: Mapping[str, float]) -> None:
        """Set knobs between steps (a curriculum stage does); each is validated where it lands."""
        for name, value in knobs.items():
            if name in self.knobs:
                setattr(self, name, value)
            elif name in self.loss.knobs:
                self.loss.set_knob(name, value)
            else:
                raise ConfigError(
                    f"stage knob {name}",
                    value,
                    f"is not a knob of {type(self).__name__}",
                    f"use one of {sorted(self.knob_names())}",
                )

    def compute_loss(self, batch: Batch, observer: chunked.ChunkObserver | None = None) -> dict[str, Tensor]:
        """``{"loss": total, "ce_loss": ..., "kd_loss": ...}`` for one batch (terms detached, total not).
        ``observer`` sees every chunk's logits (evaluation updates its metrics that way)."""
        student, teacher = self.student_forward(batch), self.teacher_forward(batch)
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        student_features = student.last[:, :-1][keep]  # (N, H_s)
        plan = self._plan(self.teacher_chunks(batch, teacher, keep), labels, observer)
        losses = chunked.head_losses(student_features, plan)
        if self.hidden_loss is not None and teacher is not None:
            mask = batch.get("attention_mask")
            hidden = self.hidden_loss(
                student.hidden_states, teacher.hidden_states, None if mask is None else mask.bool()
            )
            losses["hidden_loss"] = hidden.detach()
            losses["loss"] = losses["loss"] + self.hidden_loss.weight * hidden
        return losses

    def teacher_chunks(
        self, batch: Batch, teacher: BodyOutput | None, keep: Tensor
    ) -> chunked.TeacherChunks | None:
        """The teacher's side of the loss at the kept positions ``keep`` ``(B, T-1)``: the live teacher's
        logits through its head, chunk by chunk, or the targets of a teacher cache (None without either)."""
        head = self.teacher_head()
        if teacher is None or head is None:
            return None if self.cached_teacher is None else self.cached_teacher.chunks(self, batch)
        return chunked.HeadTeacher(teacher.last[:, :-1][keep], head)  # (N, H_t) through the head

    def exportable_models(self) -> dict[str, nn.Module]:
        """The models a checkpoint keeps for ``distilkit export``, by their state-dict prefix."""
        return {"student": self.student}

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        losses = self.compute_loss(batch)
        self.guard.watch(losses, batch["input_ids"].shape[0])  # checked with the gradients, one sync a step
        if self.trainer.accumulate_grad_batches > 1 and not self._checked():
            return None  # a micro-batch is checked before its backward: Lightning skips a bad one alone
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the step's loss terms and gradients (one device sync); on a non-finite one ``stop`` raises
        and ``skip`` updates nothing. Finite terms are logged here."""
        self.average_whole_gradients()  # FSDP2 only: once per optimizer step, as DDP would
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self._checked(grads):
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left as they are

    def _checked(self, grads: list[Tensor] | None = None) -> bool:
        watched = self.guard.check(self.trainer.strategy, self.global_step, grads or [])  # stop: raises
        if watched is None:
            self.log("train/nonfinite_skips", float(self.guard.total), batch_size=1)
            return False
        for losses, size in watched:  # sync_dist: under DDP the logged loss is the mean over processes
            self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size, sync_dist=True)
            self.log_dict(
                {f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=size, sync_dist=True
            )
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return True

    # ------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: Batch, stage: str) -> None:
        """Loss terms, perplexities and agreement, from the logits of the training loss's chunk loop."""
        metrics: Any = self.eval_metrics[stage]
        losses = self.compute_loss(batch, metrics.observe)
        size = max(int(next_token_targets(batch["labels"])[0].sum()), 1)
        self.log(f"{stage}/loss", losses.pop("loss"), prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, batch_size=size, sync_dist=True)
        for name, metric in metrics.logged(with_teacher="kd_loss" in losses).items():
            self.log(f"{stage}/{name}", metric, prog_bar=name == "ppl")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Per-position NLL of the next token, ``(B, T-1)`` for the student (and teacher), NaN where no token
        is predicted; :class:`~distilkit.callbacks.PredictionWriter` turns them into per-document rows."""
        keep, _ = next_token_targets(batch["labels"])  # (B, T-1)
        nll = NextTokenNLL(keep, with_teacher=self.teacher is not None)
        self.compute_loss(batch, nll.observe)
        return nll.result()

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]  # the teacher is frozen: never here
        optimizer = self.optimizer_factory(trainable)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ hooks
    def configure_callbacks(self) -> list[L.Callback]:
        """What export and resume need; the data's tokenizer is the models'; schedule length; a cache."""
        cache = [self.cached_teacher] if self.cached_teacher is not None else []
        return [RunState(), TokenizerCheck(), ScheduleLengthCheck(), *cache]

    def models_to_shard(self) -> dict[str, nn.Module]:
        return {"student": self.student} | ({"teacher": self.teacher} if self.teacher is not None else {})

    def on_fit_start(self) -> None:
        """Refuse a model whose logits the chunked heads would not reproduce (once, before any step)."""
        if self._heads_checked or self.chunk_size is None:
            return
        check_head(self.student, self.student_head(), "model.student")
        teacher_head = self.teacher_head()
        if self.teacher is not None and teacher_head is not None:
            check_head(self.teacher, teacher_head, "model.teacher")
        self._heads_checked = True

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # a cut student's config; a LoRA student's base and settings
        check_models_match(checkpoint, self.exportable_models())  # another architecture: a clear error

    def on_train_start(self) -> None:
        self.train()  # from_pretrained returns eval-mode models and Lightning 2.6 keeps modes as found

    def train(self, mode: bool = True) -> DistillationModule:
        """Set the mode of everything but the teacher, which stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---------------------------------------------------------------------------------------------- helpers
    def _plan(
        self, teacher: chunked.TeacherChunks | None, labels: Tensor, observer: chunked.ChunkObserver | None
    ) -> chunked.HeadLossPlan:
        weights = self.loss_weights()
        return chunked.HeadLossPlan(
            student_head=self.student_head(), teacher=teacher, labels=labels, terms=self._terms,
            names=tuple(weights), weights=weights, chunk_size=self.chunk_size, observer=observer,
            closed_form=self._closed_form,
        )  # fmt: skip
