"""DistillationModule: a trainable student, a frozen teacher and a pluggable loss."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from distilkit.errors import ConfigError, TrainingStopped, check_range
from distilkit.heads import BodyOutput, OutputHead, body_features, check_head, output_head
from distilkit.loggers import log_step_before_checkpoint, rewind_csv_loggers, wandb_loggers
from distilkit.losses import DistillationLoss, ForwardKLLoss, HiddenStateLoss
from distilkit.losses.chunked import HeadLossPlan, auto_chunk_size, chunk_slices, head_losses
from distilkit.metrics import DistillationKL, TokenPerplexity, TopKAgreement
from distilkit.models import ModelSpec, check_context, load_causal_lm, parse_dtype, shared_vocab_size
from distilkit.sharding import average_replicated_gradients, clip_gradients, local_shard, shard_blocks

Batch = Mapping[str, Tensor]
IGNORE_INDEX = -100


class DistillationModule(L.LightningModule):
    """Distil a frozen teacher into a student: total = (1 − kd_ratio)·CE + kd_ratio·KD.

    CE is the student's next-token cross-entropy on the labels; KD is ``loss(student, teacher)`` on the
    same positions; an optional ``hidden_loss`` adds its weighted intermediate-layer term. CE and KD
    come from the final hidden states through each model's output head in chunks
    of ``chunk_size`` tokens, so the full ``(tokens, V)`` logits are never held. Without a teacher the
    module is plain language-model training (total = CE), used to pretrain teachers and baselines.

    The teacher is frozen, kept in eval mode, run under ``torch.no_grad()``, left out of the optimizer
    and never written into a checkpoint. Extend by overriding the small pieces: :meth:`student_forward`,
    :meth:`teacher_forward`, :meth:`compute_loss`, :meth:`loss_terms` and :meth:`loss_weights`.

    Args:
        student: a Hugging Face model directory or hub name, a config mapping (random init), or a module.
        teacher: the same forms, or None for training without a teacher.
        loss: the KD divergence (default ``ForwardKLLoss(temperature=1.0)``).
        hidden_loss: optional intermediate-layer loss, added as ``hidden_loss.weight · term``; its
            projections train with the student and are never exported.
        kd_ratio: weight of KD in the total, in [0, 1] (default 0.5).
        chunk_size: tokens per chunk of the loss; ``"auto"`` chooses it from a byte budget; None forms the
            full logits at once (the reference path).
        teacher_dtype: dtype to load the teacher in (``"bfloat16"`` halves its memory). The student is
            always float32; mixed precision is the trainer's ``precision`` setting.
        compile_loss: compile :meth:`loss_terms` with ``torch.compile``, which fuses the per-chunk
            softmaxes, divergences and their gradients (about 3x faster loss on CPU; the first steps
            pay the compilation).
        nonfinite: what a non-finite loss term or gradient does: ``stop`` training with a message naming
            the step and the term, or ``skip`` the update (counted as ``train/nonfinite_skips``).
        max_nonfinite_skips: with ``skip``, stop after this many skipped steps in a row.
        optimizer: builds the optimizer from the trainable parameters (the student's, plus any of the loss).
        lr_scheduler: builds an LR scheduler from the optimizer; stepped every optimizer step.
        vocab_size: the tokenizer's size: fills config mappings and settles padded vocabularies. Linked
            from the data module by the CLI.
        block_size: context length; fills the positions of config mappings. Linked from the data module.
        eos_token_id: fills the bos/eos ids of config mappings. Linked from the data module.
    """

    def __init__(
        self,
        student: ModelSpec,
        teacher: ModelSpec | None = None,
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
    ) -> None:
        super().__init__()
        plain = [
            name for name, spec in (("student", student), ("teacher", teacher)) if isinstance(spec, nn.Module)
        ]
        self.save_hyperparameters(ignore=["loss", "hidden_loss", "optimizer", "lr_scheduler", *plain])
        self.kd_ratio = kd_ratio
        if not (
            chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size > 0)
        ):
            raise ConfigError(
                "model.chunk_size", chunk_size, "must be a positive integer", 'use "auto" or null'
            )
        defaults = {
            "vocab_size": vocab_size,
            "max_position_embeddings": block_size,
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
        }
        self.student = load_causal_lm(student, field="model.student", dtype=torch.float32, defaults=defaults)
        self.student.train()  # from_pretrained returns eval-mode models
        self.teacher: nn.Module | None = None
        if teacher is not None:
            dtype = parse_dtype("model.teacher_dtype", teacher_dtype)
            self.teacher = load_causal_lm(teacher, field="model.teacher", dtype=dtype, defaults=defaults)
            self.teacher.requires_grad_(False).eval()
        self.vocab_size = shared_vocab_size(self.student, self.teacher, vocab_size)
        if block_size is not None:
            for field, model in (("model.student", self.student), ("model.teacher", self.teacher)):
                check_context(field, model, block_size)
        self.chunk_size = auto_chunk_size(self.vocab_size) if chunk_size == "auto" else chunk_size
        self.loss = loss if loss is not None else ForwardKLLoss()
        self.hidden_loss = hidden_loss
        if hidden_loss is not None:
            if self.teacher is None:
                raise ConfigError(
                    "model.hidden_loss",
                    type(hidden_loss).__name__,
                    "needs a teacher",
                    "set model.teacher or drop hidden_loss",
                )
            (student_width, student_depth), (teacher_width, teacher_depth) = map(
                _width_and_depth, (self.student, self.teacher)
            )
            hidden_loss.bind(student_width, teacher_width, student_depth, teacher_depth)
        self._terms = torch.compile(self.loss_terms) if compile_loss else self.loss_terms
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.eval_metrics = nn.ModuleDict({stage: self._make_metrics() for stage in ("val", "test")})
        self._heads_checked = False
        self._tokenizer_files: tuple[Any, dict[str, str]] | None = None
        if nonfinite not in ("stop", "skip"):
            raise ConfigError("model.nonfinite", nonfinite, "is not a policy", "use stop or skip")
        self.nonfinite, self.max_nonfinite_skips = nonfinite, max_nonfinite_skips
        self._skips_in_a_row = 0
        self._skips_total = 0
        self._shard_group: Any = None  # the data-parallel process group once configure_model sharded

    @property
    def kd_ratio(self) -> float:
        return self._kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        self._kd_ratio = check_range("model.kd_ratio", value, 0.0, 1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Student logits ``(B, T, V)`` for ``(B, T)`` token ids."""
        batch = {"input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        body = self.student_forward(batch)
        return self.student_head()(body.last)

    # ----------------------------------------------------------------------------------------------- pieces
    def student_forward(self, batch: Batch) -> BodyOutput:
        """The student's final hidden states ``(B, T, H_s)`` (its logits for a module without a head),
        plus every layer's when a ``hidden_loss`` needs them."""
        return body_features(
            self.student,
            batch["input_ids"],
            batch.get("attention_mask"),
            output_hidden_states=self.hidden_loss is not None,
        )

    def teacher_forward(self, batch: Batch) -> BodyOutput | None:
        """The teacher's :class:`BodyOutput` under no_grad, or None without a teacher."""
        if self.teacher is None:
            return None
        with torch.no_grad():
            return body_features(
                self.teacher,
                batch["input_ids"],
                batch.get("attention_mask"),
                output_hidden_states=self.hidden_loss is not None,
            )

    def student_head(self) -> OutputHead:
        return output_head(self.student, self.vocab_size)

    def teacher_head(self) -> OutputHead | None:
        return None if self.teacher is None else output_head(self.teacher, self.vocab_size)

    def loss_terms(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor
    ) -> dict[str, Tensor]:
        """Named loss terms, each a mean over the given positions.

        Args:
            student_logits: ``(N, V)`` at valid positions (one chunk of them).
            teacher_logits: ``(N, V)`` or None without a teacher.
            labels: ``(N,)`` next-token targets.
        """
        count = max(labels.numel(), 1)
        terms = {"ce_loss": F.cross_entropy(student_logits.float(), labels, reduction="sum") / count}
        if teacher_logits is not None:
            terms["kd_loss"] = self.loss(student_logits, teacher_logits)
        return terms

    def loss_weights(self) -> dict[str, float]:
        """Weight of each term of :meth:`loss_terms` in the total (its keys name the terms)."""
        if self.teacher is None:
            return {"ce_loss": 1.0}
        return {"ce_loss": 1.0 - self.kd_ratio, "kd_loss": self.kd_ratio}

    def knob_names(self) -> set[str]:
        """Names :meth:`apply_knobs` accepts: ``kd_ratio``, ``temperature`` and the loss's own numeric
        settings (``beta``, ``alpha``, ``weight`` ...). A subclass adds its own by extending both."""
        loss_settings = {
            name for name in ("temperature", "beta", "alpha", "weight") if hasattr(self.loss, name)
        }
        return {"kd_ratio"} | loss_settings

    def apply_knobs(self, knobs: Mapping[str, float]) -> None:
        """Set distillation knobs between steps (a curriculum stage does): ``kd_ratio`` on the module,
        anything else on the loss (``temperature``, ``beta`` ...). Values are validated where they land."""
        for name, value in knobs.items():
            if name not in self.knob_names():
                raise ConfigError(
                    f"stage knob {name}",
                    value,
                    f"is not a knob of {type(self).__name__}",
                    f"use one of {sorted(self.knob_names())}",
                )
            setattr(self if name == "kd_ratio" else self.loss, name, value)

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        """``{"loss": total, "ce_loss": ..., "kd_loss": ...}`` for one batch (terms detached, total not)."""
        student, teacher = self.student_forward(batch), self.teacher_forward(batch)
        student_features, teacher_features, labels = self.valid_positions(
            student.last, None if teacher is None else teacher.last, batch["labels"]
        )
        losses = head_losses(student_features, self._plan(teacher_features, labels))
        if self.hidden_loss is not None and teacher is not None:
            mask = batch.get("attention_mask")
            keep = None if mask is None else mask.bool()  # (B, T)
            hidden = self.hidden_loss(student.hidden_states, teacher.hidden_states, keep)
            losses["hidden_loss"] = hidden.detach()
            losses["loss"] = losses["loss"] + self.hidden_loss.weight * hidden
        return losses

    def valid_positions(
        self, student_features: Tensor, teacher_features: Tensor | None, labels: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Shift for next-token prediction and keep positions whose target is not ignored.

        ``(B, T, H_s)``, ``(B, T, H_t)``, ``(B, T)`` -> ``(N, H_s)``, ``(N, H_t)``, ``(N,)``.
        """
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        student = student_features[:, :-1][keep]  # (N, H_s)
        teacher = None if teacher_features is None else teacher_features[:, :-1][keep]  # (N, H_t)
        return student, teacher, targets[keep]

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        losses = self.compute_loss(batch)
        finite = torch.stack([torch.isfinite(v).all() for v in losses.values()]).tolist()  # one device sync
        bad = [name for name, ok in zip(losses, finite, strict=True) if not ok]
        if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self._skip_or_stop(f"loss terms {bad or 'on another process'}", losses)
            return None  # Lightning skips backward and the optimizer step
        self._skips_in_a_row = 0
        size = batch["input_ids"].shape[0]
        # sync_dist: under DDP the logged loss is the mean over processes (one all-reduce of a few scalars)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        terms = {f"train/{k}": v for k, v in losses.items() if k != "loss"}
        self.log_dict(terms, batch_size=size, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Catch a non-finite gradient with a finite loss; with ``skip`` the step updates nothing. Sharded
        (FSDP2): first average the gradients FSDP does not manage, once per optimizer step, as DDP would."""
        if self._shard_group is not None:
            average_replicated_gradients(self, self._shard_group)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all_finite(grads)
        if self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
            self._skip_or_stop("gradients", {})
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left as they are

    def _skip_or_stop(self, what: str, losses: Mapping[str, Tensor]) -> None:
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        where = f"step {self.global_step}: non-finite {what}" + (f" ({values})" if values else "")
        if self.nonfinite == "stop":
            raise TrainingStopped(
                f"{where}. Nothing from this step was saved; lower the learning rate, check "
                "the inputs and the teacher's outputs, or set model.nonfinite: skip."
            )
        self._skips_in_a_row += 1
        self._skips_total += 1
        self.log("train/nonfinite_skips", float(self._skips_total), batch_size=1)
        if self._skips_in_a_row > self.max_nonfinite_skips:
            raise TrainingStopped(
                f"{where}: {self._skips_in_a_row} steps in a row were skipped "
                f"(model.max_nonfinite_skips={self.max_nonfinite_skips}); training stopped."
            )

    # ------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: Batch, stage: str) -> None:
        """Loss terms, perplexities and agreement, walking the logits chunk by chunk."""
        student_body, teacher_body = self.student_forward(batch), self.teacher_forward(batch)
        student, teacher, labels = self.valid_positions(
            student_body.last, None if teacher_body is None else teacher_body.last, batch["labels"]
        )
        plan = self._plan(teacher, labels)
        metrics: Any = self.eval_metrics[stage]
        sums = {name: student.new_zeros((), dtype=torch.float32) for name in plan.names}
        for rows in chunk_slices(labels.numel(), self.chunk_size):
            raw = plan.student_head.raw(student[rows])  # (n, V)
            student_logits = plan.student_head.post(raw)  # (n, V)
            teacher_logits = plan.teacher_logits(rows)  # (n, V) or None
            metrics["ppl"].update(F.cross_entropy(student_logits.float(), labels[rows], reduction="none"))
            terms = plan.chunk_terms(raw, rows, teacher_logits)
            sums = {name: sums[name] + terms[name] for name in plan.names}
            if teacher_logits is not None:
                nll = F.cross_entropy(teacher_logits.float(), labels[rows], reduction="none")
                metrics["teacher_ppl"].update(nll)
                metrics["top1_agreement"].update(student_logits, teacher_logits)
                metrics["kl"].update(student_logits, teacher_logits)
        size = max(labels.numel(), 1)
        self.log(f"{stage}/loss", plan.weighted(sums), prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({f"{stage}/{k}": v for k, v in sums.items()}, batch_size=size, sync_dist=True)
        self.log(f"{stage}/ppl", metrics["ppl"], prog_bar=True)
        if self.teacher is not None:
            self.log(f"{stage}/teacher_ppl", metrics["teacher_ppl"])
            self.log(f"{stage}/top1_agreement", metrics["top1_agreement"])
            self.log(f"{stage}/kl", metrics["kl"])

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]  # the teacher is frozen: never here
        optimizer = self.optimizer_factory(trainable)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ hooks
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard the transformer blocks of the student and the
        teacher with FSDP2 over the data-parallel processes (:mod:`distilkit.sharding`)."""
        mesh = self._device_mesh  # set by ModelParallelStrategy; None under any other strategy
        if mesh is None or self._shard_group is not None:
            return
        if mesh["tensor_parallel"].size() != 1:
            raise ConfigError(
                "trainer.strategy.tensor_parallel_size",
                mesh["tensor_parallel"].size(),
                "is not supported (distilkit shards data-parallel only)",
                "set tensor_parallel_size: 1 and data_parallel_size to the number of processes",
            )
        data_parallel = mesh["data_parallel"]
        counts = [shard_blocks(m, data_parallel) for m in (self.student, self.teacher) if m is not None]
        rank_zero_info(
            f"distilkit: FSDP2 shards {' and '.join(map(str, counts))} blocks (student, teacher) "
            f"over {data_parallel.size()} processes"
        )
        self._shard_group = data_parallel.get_group()
        self.strict_loading = False  # the strategy loads state itself; checkpoints hold no teacher

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, or under FSDP2 :func:`~distilkit.sharding.clip_gradients` (sharded and whole
        gradients together)."""
        if self._shard_group is None or not gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        clip_gradients(self, float(gradient_clip_val), gradient_clip_algorithm or "norm", self._shard_group)

    def on_fit_start(self) -> None:
        self._check_heads()

    def on_train_start(self) -> None:
        self.train()  # from_pretrained returns eval-mode models and Lightning 2.6 keeps modes as found

    def on_validation_start(self) -> None:
        self._check_heads()

    def on_test_start(self) -> None:
        self._check_heads()

    def train(self, mode: bool = True) -> DistillationModule:
        """Set the mode of everything but the teacher, which stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The module's state without the teacher (checkpoints hold the student and what trains with it)."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for key in [k for k in state if k.startswith(f"{prefix}teacher.")]:
            del state[key]
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state saved by :meth:`state_dict`; the teacher keeps its own weights (strict otherwise)."""
        if self.teacher is not None and not any(k.startswith("teacher.") for k in state_dict):
            teacher_state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
            state_dict = {**state_dict, **teacher_state}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what ``distilkit export`` needs: the student's config and the run's tokenizer files.

        Refuses (before anything is written) to checkpoint a student with non-finite weights."""
        if not all_finite(list(self.student.parameters())):
            raise TrainingStopped(
                f"step {self.global_step}: the student has non-finite weights; no checkpoint "
                "was written. Resume from the last good checkpoint with a lower learning rate."
            )
        from distilkit.export import tokenizer_files

        extra: dict[str, Any] = {"vocab_size": self.vocab_size}
        config = getattr(self.student, "config", None)
        if config is not None:
            extra["student_config"] = config.to_dict()
        trainer = self._trainer  # None when saved outside a fit
        if trainer is not None:
            log_step_before_checkpoint(trainer)  # no logged row may be lost to a kill right after this save
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is not None:
            if self._tokenizer_files is None or self._tokenizer_files[0] is not tokenizer:
                self._tokenizer_files = (tokenizer, tokenizer_files(tokenizer))  # serialised once per run
            extra["tokenizer_files"] = self._tokenizer_files[1]
        extra["rng"] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
        if torch.cuda.is_available():
            extra["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        wandb_ids = [logger.version for logger in wandb_loggers(trainer)] if trainer is not None else []
        if wandb_ids:
            extra["wandb_run_id"] = str(wandb_ids[0])  # a resumed fit continues this W&B run
        checkpoint["distilkit"] = extra
        state = checkpoint.get("state_dict") or {}
        for key in [key for key in state if key.startswith("teacher.")]:  # strategies that gather state
            del state[key]  # themselves (FSDP2) bypass this module's state_dict

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random state of the interrupted run (dropout masks continue as they would have).
        A resumed fit drops the CSV rows the interrupted run logged past this checkpoint (logged again)."""
        if self._trainer is not None and self._trainer.state.fn == "fit":
            rewind_csv_loggers(self._trainer, int(checkpoint.get("global_step", 0)))
        rng = checkpoint.get("distilkit", {}).get("rng")
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ---------------------------------------------------------------------------------------------- helpers
    def _plan(self, teacher_features: Tensor | None, labels: Tensor) -> HeadLossPlan:
        weights = self.loss_weights()
        return HeadLossPlan(
            student_head=self.student_head(),
            teacher_features=teacher_features,
            teacher_head=self.teacher_head(),
            labels=labels,
            terms=self._terms,
            names=tuple(weights),
            weights=weights,
            chunk_size=self.chunk_size,
        )

    def _make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "ppl": TokenPerplexity(),
                "teacher_ppl": TokenPerplexity(),
                "top1_agreement": TopKAgreement(k=1),
                "kl": DistillationKL(),
            }
        )

    def _check_heads(self) -> None:
        if self._heads_checked or self.chunk_size is None:
            return
        check_head(self.student, self.student_head(), "model.student")
        teacher_head = self.teacher_head()
        if self.teacher is not None and teacher_head is not None:
            check_head(self.teacher, teacher_head, "model.teacher")
        self._heads_checked = True


def _width_and_depth(model: nn.Module) -> tuple[int, int]:
    """(hidden size, number of blocks) from a Hugging Face config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            "model.hidden_loss",
            type(model).__name__,
            "has no config to read widths from",
            "use Hugging Face causal LMs with hidden_loss",
        )
    return int(config.hidden_size), int(config.num_hidden_layers)


def _plain(state: Any) -> Any:
    """Python's random state as lists and ints, which ``torch.load(weights_only=True)`` accepts."""
    return [_plain(x) for x in state] if isinstance(state, tuple) else state


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite, at the cost of one fused norm pass in the usual case.

    A finite L2 norm of all the norms means no NaN or inf anywhere; only a non-finite norm (a bad value, or
    an overflow of the squares) needs the exact element-wise check. Called on every step's gradients.
    Sharded tensors (FSDP2) are checked by their local shard; callers combine the processes' answers.
    """
    tensors = [local_shard(t) for t in tensors]
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
