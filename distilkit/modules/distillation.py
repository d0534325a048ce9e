"""DistillationModule: a trainable student, a frozen teacher and a pluggable loss."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from distilkit.batch import Batch, model_inputs, next_token_targets
from distilkit.errors import check_range
from distilkit.losses import DistillationLoss, ForwardKLLoss, HiddenStateLoss, chunked
from distilkit.losses.aligned import teacher_terms
from distilkit.losses.base import cross_entropy
from distilkit.losses.compiled import CompiledTerms
from distilkit.losses.workspace import Workspace
from distilkit.models.checkpoint import check_models_match
from distilkit.models.heads import BodyOutput, OutputHead, body_features, check_head, output_head
from distilkit.models.loading import ModelSpec
from distilkit.models.sharding import ShardedTraining
from distilkit.models.student_hooks import StudentHooks
from distilkit.modules.base import DistillationBase, Scorer
from distilkit.modules.guards import NonFiniteGuard
from distilkit.teachers import (
    Split,
    TeacherLoader,
    TeacherSource,
    TeacherTokenizer,
    Teaching,
    for_data,
    open_teacher,
)
from distilkit.teachers.served import is_served
from distilkit.teachers.several import MixBy, Unrouted


class DistillationModule(ShardedTraining, StudentHooks, DistillationBase):  # type: ignore[misc]
    """Distil a frozen teacher into a student: total = (1 − kd_ratio)·CE + kd_ratio·KD.

    CE is the student's next-token cross-entropy on the labels; KD is ``loss(student, teacher)`` on the
    same positions; an optional ``hidden_loss`` adds its weighted intermediate-layer term. CE and KD come
    from the final hidden states through each model's output head in chunks of ``chunk_size`` tokens, so the
    full ``(tokens, V)`` logits are never held. Without a teacher the module is plain language-model
    training (total = CE), used to pretrain teachers and baselines.

    The teacher's side of the loss is a :class:`~distilkit.teachers.TeacherSource`: a live model (frozen, in
    eval mode, run under ``torch.no_grad()``, left out of the optimizer and never written into a checkpoint),
    or an offline teacher cache (``teacher_cache``), or any source passed in code. Under Lightning's
    ``ModelParallelStrategy`` student and teacher are sharded with FSDP2
    (:class:`~distilkit.models.sharding.ShardedTraining`). Students cut from the teacher or trained through
    LoRA adapters are handled by :class:`~distilkit.models.student_hooks.StudentHooks`; evaluation, knobs,
    optimizers and callbacks by :class:`~distilkit.modules.base.DistillationBase`.
    Extend by overriding the small pieces: :meth:`student_forward`, :meth:`teacher_forward`,
    :meth:`compute_loss`, :meth:`loss_terms` and :meth:`loss_weights`.

    Args:
        student: a Hugging Face model directory or hub name, a config mapping (random init), a module, or
            ``{from_teacher: {...}}``: cut from the teacher (:mod:`distilkit.models.from_teacher`).
        teacher: the same forms, a :class:`~distilkit.teachers.TeacherSource`, ``{server: URL, model: NAME,
            top_k: K}`` for a teacher behind a vLLM server (:mod:`distilkit.teachers.served`), or None for
            training without a teacher (or from ``teacher_cache``).
        teacher_cache: a directory written by ``distilkit cache``, to train from instead of a teacher.
        teacher_tokenizer: the tokenizer the teacher reads text with (a directory or GGUF file); default: the
            one saved with the teacher directory or GGUF file (for a config mapping or a module: the data's).
            When it is not ``data.tokenizer`` the teacher runs on its own tokens of the same text
            (:class:`~distilkit.teachers.AlignedTeacher`) and only a cross-tokenizer loss is accepted
            (``ULDLoss``, ``GOLDLoss``).
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
        lr_scheduler: builds an LR scheduler from the optimizer; stepped every optimizer step. A length it
            leaves out (``total_steps`` of ``OneCycleLR``) is the run's number of optimizer steps.
        vocab_size: the tokenizer's size: fills config mappings and settles padded vocabularies. Linked
            from the data module by the CLI.
        block_size: context length; fills the positions of config mappings. Linked from the data module.
        eos_token_id: fills the bos/eos ids of config mappings. Linked from the data module.
        student_adapter: train a pretrained student through LoRA adapters, ``{r, alpha, target_modules,
            dropout}`` (:mod:`distilkit.models.adapters`): only they train and are checkpointed.
        teachers: several teachers by name, ``{NAME: spec}`` (each as ``teacher`` takes one, or ``{cache:
            DIR}``), in place of ``teacher`` (:mod:`distilkit.teachers.several`).
        route_by: with ``teachers``: the row field naming each document's teacher (default ``teacher``), or
            ``file`` (the data file it came from). Validation logs ``val/<domain>/ppl`` per value.
        mix: with ``teachers``, instead of routing: ``{NAME: weight}``, every position learns from the
            weighted mixture of the teachers' distributions; knobs ``mix.NAME``.
        unrouted: routing: rows naming no teacher are an ``error``, or learn from their ``labels`` alone.
        mix_by: mixing: every position by ``mix``'s ``weights``, or by the ``posterior`` of each teacher given
            the token that follows (``mix`` the prior): each token learns mostly from the teacher that
            knows it best.
    """

    knobs: ClassVar[tuple[str, ...]] = ("kd_ratio",)
    teacher_source: TeacherSource | None

    def __init__(
        self,
        student: ModelSpec,
        teacher: ModelSpec | None = None,
        teacher_cache: str | None = None,
        teacher_tokenizer: str | None = None,
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
        teachers: Mapping[str, ModelSpec | None] | None = None,
        route_by: str | None = None,
        mix: dict[str, float] | None = None,
        unrouted: Unrouted = "error",
        mix_by: MixBy = "weights",
    ) -> None:
        super().__init__()
        modules = [
            name for name, spec in (("student", student), ("teacher", teacher)) if isinstance(spec, nn.Module)
        ] + (["teachers"] if any(isinstance(t, nn.Module) for t in (teachers or {}).values()) else [])
        self.save_hyperparameters(ignore=["loss", "hidden_loss", "optimizer", "lr_scheduler", *modules])
        self.kd_ratio = kd_ratio
        self.guard = NonFiniteGuard(nonfinite, max_nonfinite_skips)
        given = teacher if isinstance(teacher, TeacherSource) else None
        tokens = TeacherTokenizer.resolve(
            None if given is not None else teacher, teacher_tokenizer, teacher_cache, vocab_size
        )
        apart = tokens.load(teacher, student, teacher_dtype) if tokens.apart else None  # its own vocabulary
        no_model = given is not None or is_served(teacher) or apart is not None  # loaded, or none to load
        teacher_model = self.load_models(
            student, None if no_model else teacher, student_adapter, teacher_dtype=teacher_dtype,
            vocab_size=vocab_size, block_size=block_size, eos_token_id=eos_token_id,
        )  # fmt: skip
        self.teacher_source = given or open_teacher(
            teacher, teacher_model if apart is None else apart, teacher_cache, self.vocab_size, tokens,
            teachers=teachers, route_by=route_by, mix=mix, unrouted=unrouted, mix_by=mix_by,
            load=TeacherLoader(
                self.student, self.vocab_size, teacher_dtype, vocab_size, block_size, eos_token_id
            ),
        )  # fmt: skip
        widest = max(self.vocab_size, getattr(self.teacher_source, "vocab_size", 0))
        self.chunk_size = chunked.resolve_chunk_size(chunk_size, widest)
        self.loss = loss if loss is not None else ForwardKLLoss()
        self.hidden_loss = hidden_loss
        if hidden_loss is not None:
            hidden_loss.bind_models(self.student, self.teacher)
        self._terms = CompiledTerms(self.loss_terms) if compile_loss else self.loss_terms
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.workspace = Workspace()  # the chunked loss's buffers, kept from step to step
        self.init_evaluation(scored=1)

    @property
    def kd_ratio(self) -> float:
        return self._kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        self._kd_ratio = check_range("model.kd_ratio", value, 0.0, 1.0)

    @property
    def domains(self) -> str | None:
        """What the data must carry for each token (its document's domain, :mod:`distilkit.data.domains`):
        what the teacher source asks for (several teachers: the field they are routed by), else None."""
        return None if self.teacher_source is None else self.teacher_source.domains

    @property
    def teacher(self) -> nn.Module | None:  # type: ignore[override]
        """The teacher model, when one runs in this module (a live teacher); else None."""
        return None if self.teacher_source is None else self.teacher_source.model

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

    def teacher_forward(self, batch: Batch) -> Teaching | None:
        """What the teacher says about ``batch`` (a live teacher runs under no_grad: its final hidden states,
        and every layer's when a ``hidden_loss`` needs them), or None without a teacher."""
        if self.teacher_source is None:
            return None
        split: Split = "train" if self.training else "val"
        return self.teacher_source.teach(batch, split, hidden=self.hidden_loss is not None)

    def student_head(self) -> OutputHead:
        return output_head(self.student, self.vocab_size)

    def loss_terms(
        self, student_logits: Tensor, teacher: chunked.TeacherChunk, labels: Tensor
    ) -> dict[str, Tensor]:
        """Named loss terms, each a mean over the given positions.

        Args:
            student_logits: ``(N, V)`` at valid positions (one chunk of them).
            teacher: the teacher's ``(N, V)`` logits or sparse targets, or None without a teacher.
            labels: ``(N,)`` next-token targets.
        """
        if teacher is None:
            return {"ce_loss": cross_entropy(student_logits, labels)}
        kd, ce = self.loss.kd_and_ce(student_logits, teacher, labels)
        return {"ce_loss": ce, "kd_loss": kd, **teacher_terms(teacher)}

    def loss_weights(self) -> dict[str, float]:
        """Weight of each term of :meth:`loss_terms` in the total (its keys name the terms)."""
        if self.teacher_source is None:
            return {"ce_loss": 1.0}
        logged = dict.fromkeys(self.teacher_source.logged_terms, 0.0)
        return {"ce_loss": 1.0 - self.kd_ratio, "kd_loss": self.kd_ratio, **logged}

    def compute_loss(
        self,
        batch: Batch,
        observer: chunked.ChunkObserver | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        """``{"loss": total, "ce_loss": ..., "kd_loss": ...}`` for one batch (terms detached, total not).

        Args:
            batch: the batch.
            observer: sees every chunk's logits (evaluation updates its metrics that way).
            weights: the terms' weights in the total (default :meth:`loss_weights`).
        """
        student, teacher = self.student_forward(batch), self.teacher_forward(batch)
        if self.teacher_source is not None:
            self.teacher_source.check_knobs(self.loss)  # a curriculum stage may have changed the temperature
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        weights = dict(self.loss_weights() if weights is None else weights)
        plan = chunked.HeadLossPlan(
            student_head=self.student_head(), teacher=None if teacher is None else teacher.at(keep),
            labels=labels, terms=self._terms, names=tuple(weights), weights=weights,
            chunk_size=self.chunk_size, observer=observer, workspace=self.workspace,
        )  # fmt: skip
        losses = chunked.head_losses(student.last[:, :-1][keep], plan)  # (N, H_s) through the head
        losses |= getattr(teacher, "logged", {})  # e.g. several teachers' labels_only_share
        if self.hidden_loss is not None and teacher is not None:
            mask = batch.get("attention_mask")
            hidden = self.hidden_loss(
                student.hidden_states, teacher.hidden_states, None if mask is None else mask.bool()
            )
            losses["hidden_loss"] = hidden.detach()
            losses["loss"] = losses["loss"] + self.hidden_loss.weight * hidden
        return losses

    def knob_names(self) -> set[str]:
        """The module's and the loss's knobs, and the teacher source's (mixed teachers' ``mix.NAME``)."""
        return super().knob_names() | set(() if self.teacher_source is None else self.teacher_source.knobs)

    def knob_fix(self, unknown: Iterable[str]) -> str:
        """The teacher source's hint (why knobs ``unknown`` are not here), then the knobs there are."""
        fix, source = super().knob_fix(unknown), self.teacher_source
        hint = "" if source is None else source.knob_hint(unknown)
        return f"{hint}; {fix}" if hint else fix

    def set_knob(self, name: str, value: float) -> bool:
        source = self.teacher_source
        return super().set_knob(name, value) or (source is not None and source.set_knob(name, value))

    def apply_knobs(self, knobs: Mapping[str, float]) -> None:
        """Set a stage's knobs, then check that the teacher can teach with them all (not every mixture
        weight 0; a cache's temperature kept)."""
        super().apply_knobs(knobs)
        if self.teacher_source is not None:
            self.teacher_source.check_knobs(self.loss)

    def knob_state(self) -> dict[str, Any]:
        source = self.teacher_source
        return super().knob_state() | {"teacher": None if source is None else source.knob_state()}

    def load_knob_state(self, state: Mapping[str, Any]) -> None:
        super().load_knob_state(state)
        if self.teacher_source is not None:
            self.teacher_source.load_knob_state(state["teacher"])

    def scorers(self, batch: Batch) -> dict[str, Scorer]:
        return {"student": lambda observer: self.compute_loss(batch, observer)}

    def teaches_whole_distributions(self) -> bool:
        return self.teacher_source is not None and self.teacher_source.full_distribution

    def exportable_models(self) -> dict[str, nn.Module]:
        """The models a checkpoint keeps for ``distilkit export``, by their state-dict prefix."""
        return {"student": self.student}

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        return self.training_loss(batch, self.loss_weights())

    def training_loss(self, batch: Batch, weights: Mapping[str, float]) -> Tensor | None:
        """The loss to back-propagate for ``batch`` with these term ``weights`` (None: skip the micro-batch).
        Its terms are checked with the gradients, one device sync a step
        (:meth:`on_before_optimizer_step`)."""
        losses = self.compute_loss(batch, weights=weights)
        self.guard.watch(losses, batch["input_ids"].shape[0])
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

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]  # the teacher is frozen: never here
        optimizer, scheduler = self.optimizer_and_scheduler(
            self.optimizer_factory, self.lr_scheduler_factory, trainable
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, stage: str) -> None:
        """Refuse a teacher this run cannot learn from (before anything is computed), then finish a cut
        student that ranks on data."""
        if self.teacher_source is not None and self._trainer is not None:
            data_tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
            self.teacher_source = for_data(self.teacher_source, data_tokenizer)  # another tokenizer: aligned
            self.teacher_source.check_run(self.trainer, self, stage)
        super().setup(stage)

    def configure_callbacks(self) -> list[L.Callback]:
        """The base's, and what the teacher source needs in the run (a served teacher's look-ahead)."""
        source = self.teacher_source
        return [*super().configure_callbacks(), *(source.callbacks() if source is not None else [])]

    def models_to_shard(self) -> dict[str, nn.Module]:
        teacher = self.teacher
        return {"student": self.student} | ({"teacher": teacher} if teacher is not None else {})

    def check_heads(self) -> None:
        check_head(self.student, self.student_head(), "model.student")
        if self.teacher_source is not None:
            self.teacher_source.check_head()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # a cut student's config; a LoRA student's base and settings
        check_models_match(checkpoint, self.exportable_models())  # another architecture: a clear error

    def on_train_start(self) -> None:
        self.train()  # from_pretrained returns eval-mode models and Lightning 2.6 keeps modes as found
