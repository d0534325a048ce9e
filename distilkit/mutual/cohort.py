"""MutualDistillationModule: a cohort of peers that learn from the labels and from each other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distilkit.batch import Batch, model_inputs, next_token_targets
from distilkit.errors import ConfigError, check_range
from distilkit.guards import NonFiniteGuard, ScheduleLengthCheck
from distilkit.losses import DistillationLoss, ForwardKLLoss
from distilkit.losses.chunked import (
    ChunkObserver,
    HeadLossPlan,
    TeacherChunk,
    head_losses,
    resolve_chunk_size,
)
from distilkit.losses.mixture import PeerMixture
from distilkit.metrics import EvaluationMetrics, NextTokenNLL, TopKAgreement
from distilkit.models.heads import BodyOutput, OutputHead, body_features, check_head, output_head
from distilkit.models.loading import ModelSpec
from distilkit.models.sharding import all_finite, average_replicated_gradients
from distilkit.mutual.optimizers import PeerOptimizers, PeerSchedulers
from distilkit.mutual.peers import cohort_vocab_size, load_peers, peer_index, peer_names, per_peer
from distilkit.run.state import RunState
from distilkit.run.tokenizers import TokenizerCheck

Update = Literal["alternate", "simultaneous"]


class MutualDistillationModule(L.LightningModule):
    """Deep mutual learning (Zhang et al. 2018) and online distillation (Anil et al. 2018): a cohort of two
    or more peers trained together, each on the labels and on the others' predictions.

    Peer i minimises ``(1 − kd_ratio_i)·CE_i + kd_ratio_i·KD(m_−i → peer i)``, where ``m_−i`` is the other
    peers' DETACHED distribution: ``Σ_{j≠i} w_j·p_j / Σ_{j≠i} w_j`` (equal weights unless ``weights`` are
    given; :class:`~distilkit.losses.mixture.PeerMixture`). No gradient crosses between peers. KD is any
    :class:`~distilkit.losses.DistillationLoss` (default forward KL); CE and KD come from each peer's final
    hidden states through the output heads in chunks of ``chunk_size`` tokens, the mixture formed chunk by
    chunk from the other peers' hidden states, so no ``(tokens, V)`` tensor is held whole. Peers may differ
    in size (a large peer is the online teacher of a small one) but share the tokenizer.

    Updates (``update``), with their cost per step for P trainable peers:

    - ``alternate`` (default, DML's algorithm): the peers are updated one after another on the same batch,
      each seeing the others' CURRENT predictions: the peers updated before it in this step are run again
      (no grad) after their update. Cost: P forward + P backward passes, plus P − 1 no-grad forward passes
      (the last peer's update is seen by nobody in this step).
    - ``simultaneous``: every peer is updated from the same forward pass, each seeing the others'
      predictions from before the step. Cost: P forward + P backward passes.

    Both also pay, per chunk and peer, the other peers' heads (``(P − 1)·P`` head products per step
    besides the peers' own). ``order: rotate`` starts the alternate sequence at peer ``step mod P``
    (the order follows from the step, so a resumed run keeps it).

    A peer listed with ``frozen_steps[i] = N`` is not updated for its first N steps: it runs in eval mode
    under no_grad, as a teacher does, so a pretrained peer frozen for N steps makes the first N steps
    ordinary KD from it, and fine-tunes it together with the student afterwards.

    ``burn_in_steps = N`` trains every peer on the labels alone (KD weight 0) for the first N steps, as the
    burn-in of codistillation (Anil et al. 2018): peers trained from scratch are no better than each other
    at first, and learning from an untrained peer's near-uniform predictions slows every peer down.
    Evaluation weighs its terms with the configured ``kd_ratio`` throughout.

    ``kd_positions: peer_better`` lets a peer learn from the others only where they know more: at the
    positions whose next token the others' mixture gives more probability than the peer itself does
    (``g_t = [m_t(y_t) > p_t(y_t)]``, KD ``= (1/N)·Σ_t g_t·KD_t``, logged as ``kd_share``, the mean of
    ``g``); elsewhere the peer learns from the labels alone. With two peers no position teaches both ways,
    so a large online teacher learns from its student only where the student is right and it is not (the
    per-token form of taking the best peer as the teacher, Guo et al. 2020, "Online Knowledge Distillation
    via Collaborative Learning"). ``all`` (default) is deep mutual learning as published.

    Each peer has its own optimizer (``optimizer`` builds one per peer, or ``optimizers`` gives one each)
    and LR scheduler (``lr_scheduler`` / ``lr_schedulers``), stepped every step; Lightning sees them as one
    :class:`~distilkit.mutual.optimizers.PeerOptimizers`, so ``trainer.global_step`` counts batches and a
    curriculum sets every peer's rate. Optimization is manual: clip with ``gradient_clip_val`` here (each
    peer's gradients by their own norm, as the trainer's setting would clip a model trained alone), not in
    the trainer. Under DDP each peer's gradients are averaged over the processes just before its update
    (DDP's reducer is switched off: it follows one backward pass per step, alternate runs P); FSDP2 is not
    supported. ``16-mixed`` (a loss scaler) is refused; use ``bf16-mixed``.

    Logs ``train/loss`` (mean over the peers updated), ``train/peer{i}/loss``, ``…/ce_loss``, ``…/kd_loss``,
    ``…/lr`` (and ``…/kd_share`` with ``peer_better``); ``val/loss`` and ``val/ce_loss`` (means over the
    peers), ``val/peer{i}/loss``, ``…/ce_loss``, ``…/kd_loss``, ``…/ppl``, ``…/top1_agreement`` and
    ``…/kl`` (against the others' mixture), and ``val/peer_agreement`` (the mean over peers of their top-1
    agreement with the others' mixture: with two peers, the share of positions where both predict the same
    token). Checkpoints hold every peer (``peers.0.``, ``peers.1.`` ...); ``distilkit export --peer N`` (or
    ``--peer NAME``) writes one.

    Args:
        peers: two or more model specs, as for ``student:`` (a Hugging Face directory or hub name, a config
            mapping for random init, or a module).
        names: optional names of the peers, for ``export --peer NAME`` and knobs ``NAME.kd_ratio``.
        loss: the KD divergence, shared by every peer (default ``ForwardKLLoss()``).
        kd_ratio: weight of KD in each peer's total, one value or one per peer, in [0, 1] (default 0.5).
        weights: a positive weight per peer in the mixtures the others learn from (default equal).
        update: ``alternate`` or ``simultaneous`` (above).
        order: ``fixed`` (peer order) or ``rotate`` for the alternate sequence.
        frozen_steps: per peer, the steps it stays frozen for (default 0: all train from the start; at
            least one peer must).
        burn_in_steps: the first steps in which every peer trains on the labels alone (default 0).
        kd_positions: ``all`` (every position learns from the others) or ``peer_better`` (above).
        chunk_size: tokens per chunk of the loss; ``"auto"`` from a byte budget; None unchunked.
        gradient_clip_val: clip each peer's gradient norm to this before its update (None: no clipping).
        nonfinite: ``stop`` at a non-finite loss term or gradient, or ``skip`` that peer's update.
        max_nonfinite_skips: with ``skip``, stop after this many skipped peer updates in a row.
        optimizer: builds each peer's optimizer from its parameters (when ``optimizers`` is not given).
        optimizers: one optimizer factory per peer (learning rates may differ).
        lr_scheduler: builds each peer's LR scheduler from its optimizer, stepped every step.
        lr_schedulers: one scheduler factory per peer.
        vocab_size: the tokenizer's size (linked from the data module by the CLI).
        block_size: context length (linked from the data module).
        eos_token_id: fills the bos/eos ids of config mappings (linked from the data module).
    """

    #: Settings a curriculum stage may change: ``kd_ratio`` (every peer), ``peer{i}.kd_ratio`` or
    #: ``NAME.kd_ratio`` (one peer), and the loss's own knobs.
    knobs: ClassVar[tuple[str, ...]] = ("kd_ratio",)

    def __init__(
        self,
        peers: list[ModelSpec],
        names: list[str] | None = None,
        loss: DistillationLoss | None = None,
        kd_ratio: float | list[float] = 0.5,
        weights: list[float] | None = None,
        update: Update = "alternate",
        order: Literal["fixed", "rotate"] = "fixed",
        frozen_steps: list[int] | None = None,
        burn_in_steps: int = 0,
        kd_positions: Literal["all", "peer_better"] = "all",
        chunk_size: int | Literal["auto"] | None = "auto",
        gradient_clip_val: float | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_nonfinite_skips: int = 8,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        optimizers: list[OptimizerCallable] | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_schedulers: list[LRSchedulerCallable] | None = None,
        vocab_size: int | None = None,
        block_size: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(peers, (str, Mapping, nn.Module)) or len(peers) < 2:
            raise ConfigError("model.peers", peers, "is not a cohort", "list two or more model specs")
        in_code = any(isinstance(spec, nn.Module) for spec in peers)
        ignored = ["loss", "optimizer", "optimizers", "lr_scheduler", "lr_schedulers"]
        self.save_hyperparameters(ignore=[*ignored, *(["peers"] if in_code else [])])
        self.automatic_optimization = False  # one update per peer, in turn: see PeerOptimizers
        count = len(peers)
        self.names = peer_names(names, count)
        models = load_peers(peers, vocab_size=vocab_size, block_size=block_size, eos_token_id=eos_token_id)
        self.peers = nn.ModuleList(models)
        self.vocab_size = cohort_vocab_size(models, vocab_size)
        self.chunk_size = resolve_chunk_size(chunk_size, self.vocab_size)
        self.loss = loss if loss is not None else ForwardKLLoss()
        ratios = per_peer("model.kd_ratio", kd_ratio, count)
        self.kd_ratios = [check_range("model.kd_ratio", float(r), 0.0, 1.0) for r in ratios]
        self.weights = [
            float(w) for w in per_peer("model.weights", 1.0 if weights is None else weights, count)
        ]
        if not all(w > 0 for w in self.weights):
            raise ConfigError("model.weights", weights, "must all be positive", "give each peer a weight > 0")
        self.frozen_steps = per_peer("model.frozen_steps", frozen_steps or 0, count)
        if any(n < 0 for n in self.frozen_steps) or min(self.frozen_steps) > 0:
            raise ConfigError(
                "model.frozen_steps",
                frozen_steps,
                "must be >= 0 with at least one 0",
                "let a peer train at once",
            )
        if burn_in_steps < 0:
            raise ConfigError("model.burn_in_steps", burn_in_steps, "must be >= 0", "use 0 for no burn-in")
        self.burn_in_steps = burn_in_steps
        if kd_positions not in ("all", "peer_better"):
            raise ConfigError(
                "model.kd_positions", kd_positions, "is not a choice of positions", "use all or peer_better"
            )
        self.kd_positions = kd_positions
        if update not in ("alternate", "simultaneous"):
            raise ConfigError("model.update", update, "is not an update", "use alternate or simultaneous")
        if order not in ("fixed", "rotate"):
            raise ConfigError("model.order", order, "is not an order", "use fixed or rotate")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ConfigError("model.gradient_clip_val", gradient_clip_val, "must be positive", "or null")
        self.update, self.order, self.gradient_clip_val = update, order, gradient_clip_val
        self.guard = NonFiniteGuard(nonfinite, max_nonfinite_skips)
        self.optimizer_factories = per_peer("model.optimizers", optimizers or optimizer, count)
        self.scheduler_factories = per_peer("model.lr_schedulers", lr_schedulers or lr_scheduler, count)
        self.eval_metrics = nn.ModuleDict(
            {stage: nn.ModuleList([EvaluationMetrics() for _ in models]) for stage in ("val", "test")}
        )
        self.agreement = nn.ModuleDict({stage: TopKAgreement(k=1) for stage in ("val", "test")})
        self._heads_checked = False
        self._average_gradients = False  # set under DDP (each training step)
        self._batch_failed = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, peer: int = 0) -> Tensor:
        """Logits ``(B, T, V)`` of peer ``peer`` for ``(B, T)`` token ids."""
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.peer_head(peer)(self.peer_forward(peer, {"input_ids": input_ids} | mask).last)

    # ----------------------------------------------------------------------------------------------- pieces
    def peer_forward(self, index: int, batch: Batch) -> BodyOutput:
        """Peer ``index``'s final hidden states ``(B, T, H_i)`` (gradients as the caller's context allows)."""
        return body_features(self.peers[index], **model_inputs(batch))

    def peer_head(self, index: int) -> OutputHead:
        return output_head(self.peers[index], self.vocab_size)

    def targets_for(self, index: int, features: Sequence[Tensor]) -> PeerMixture:
        """What peer ``index`` learns from: the detached mixture of the other peers' distributions, from
        their features ``(N, H_j)`` at the valid positions."""
        others = [j for j in range(len(self.peers)) if j != index]
        return PeerMixture.of(
            [features[j] for j in others],
            [self.peer_head(j) for j in others],
            [self.weights[j] for j in others],
        )

    def peer_terms(self, student_logits: Tensor, target: TeacherChunk, labels: Tensor) -> dict[str, Tensor]:
        """CE on the labels and KD against the others' mixture, each a mean over the ``(n, V)`` chunk.

        With ``kd_positions: peer_better`` KD is ``(1/n)·Σ_t g_t·KD_t``, where ``g_t = 1`` at the positions
        whose next token the mixture gives more probability than the peer does (``kd_share``: the mean of g).
        """
        count = max(labels.numel(), 1)
        nll = F.cross_entropy(student_logits.float(), labels, reduction="none")  # (n,)
        terms = {"ce_loss": nll.sum() / count}
        assert isinstance(target, Tensor)  # a PeerMixture hands out (n, V) tensors
        if self.kd_positions == "all":
            terms["kd_loss"] = self.loss(student_logits, target)
            return terms
        target = target.float()  # (n, V) logits or log-probabilities: -log m(y) = logsumexp(t) - t_y
        target_nll = torch.logsumexp(target, -1) - target.gather(-1, labels[:, None]).squeeze(-1)  # (n,)
        better = target_nll < nll.detach()  # (n,) the others predict the next token better here
        gated = torch.where(better, labels, self.loss.ignore_index)
        terms["kd_loss"] = self.loss(student_logits, target, gated) * (better.sum() / count)
        terms["kd_share"] = better.float().mean()
        return terms

    def peer_losses(
        self, index: int, features: Sequence[Tensor], labels: Tensor, observer: ChunkObserver | None = None
    ) -> dict[str, Tensor]:
        """``{"loss": total, "ce_loss": ..., "kd_loss": ...}`` of peer ``index`` (total differentiable when
        its ``features[index]`` are), its target the others' ``features``."""
        ratio = 0.0 if self.training and self.global_step < self.burn_in_steps else self.kd_ratios[index]
        weights = {"ce_loss": 1.0 - ratio, "kd_loss": ratio}
        names = (*weights, "kd_share") if self.kd_positions == "peer_better" else tuple(weights)
        plan = HeadLossPlan(
            student_head=self.peer_head(index),
            teacher=self.targets_for(index, features),
            labels=labels,
            terms=self.peer_terms,
            names=names,
            weights=weights,
            chunk_size=self.chunk_size,
            observer=observer,
        )
        return head_losses(features[index], plan)

    def is_frozen(self, index: int, step: int | None = None) -> bool:
        """Whether peer ``index`` is frozen at ``step`` (default: the current step)."""
        return (self.global_step if step is None else step) < self.frozen_steps[index]

    def update_order(self, step: int) -> list[int]:
        """The peers updated at ``step``, in the order they are updated (frozen ones left out)."""
        trainable = [i for i in range(len(self.peers)) if not self.is_frozen(i, step)]
        if self.order == "rotate" and trainable:
            start = step % len(trainable)
            trainable = trainable[start:] + trainable[:start]
        return trainable

    def knob_names(self) -> set[str]:
        """``kd_ratio``, ``peer{i}.kd_ratio`` and ``NAME.kd_ratio`` per peer, and the loss's knobs."""
        per_peer = {
            f"{label}.kd_ratio" for i in range(len(self.peers)) for label in (f"peer{i}", self.names[i])
        }
        return set(self.knobs) | per_peer | set(self.loss.knobs)

    def apply_knobs(self, knobs: Mapping[str, float]) -> None:
        """Set knobs between steps (a curriculum stage does); each is validated where it lands."""
        for name, value in knobs.items():
            if name == "kd_ratio":
                self.kd_ratios = [check_range("kd_ratio", float(value), 0.0, 1.0)] * len(self.peers)
            elif (
                name.endswith(".kd_ratio")
                and peer_index(name.removesuffix(".kd_ratio"), self.names) is not None
            ):
                index = peer_index(name.removesuffix(".kd_ratio"), self.names)
                self.kd_ratios[index] = check_range(name, float(value), 0.0, 1.0)  # type: ignore[index]
            elif name in self.loss.knobs:
                self.loss.set_knob(name, value)
            else:
                raise ConfigError(
                    f"stage knob {name}",
                    value,
                    f"is not a knob of {type(self).__name__}",
                    f"use one of {sorted(self.knob_names())}",
                )

    def exportable_models(self) -> dict[str, nn.Module]:
        """Every peer, by its state-dict prefix (``peers.0`` ...), for ``distilkit export --peer N``."""
        return {f"peers.{i}": peer for i, peer in enumerate(self.peers)}

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        self._switch_off_ddp_reducer()
        step = self.global_step
        order = self.update_order(step)
        for index, peer in enumerate(self.peers):
            peer.train(not self.is_frozen(index, step))  # a frozen peer predicts as a teacher does
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        features = [self._features(i, batch, keep, grad=i in order) for i in range(len(self.peers))]
        self._batch_failed = False
        updates = self._simultaneous if self.update == "simultaneous" else self._alternate
        losses = updates(batch, keep, labels, features, order)
        total = self._log_training(losses, batch["input_ids"].shape[0])  # the rates this step used
        scheduler: Any = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if not self._batch_failed:
            self.guard.passed()
        return total

    def _simultaneous(
        self, batch: Batch, keep: Tensor, labels: Tensor, features: list[Tensor], order: list[int]
    ) -> dict[int, dict[str, Tensor]]:
        """Every peer's loss from this step's forward passes; one backward; every peer updated."""
        losses = {i: self.peer_losses(i, features, labels) for i in order}
        self.manual_backward(torch.stack([losses[i]["loss"] for i in order]).sum())  # no cross-peer terms
        for i in order:
            self._prepare_update(i, losses[i])
        self._finish_step()
        return losses

    def _alternate(
        self, batch: Batch, keep: Tensor, labels: Tensor, features: list[Tensor], order: list[int]
    ) -> dict[int, dict[str, Tensor]]:
        """One peer at a time, each against the others' current predictions."""
        seen = list(features)  # each peer's predictions as the peers updated after it see them
        losses: dict[int, dict[str, Tensor]] = {}
        for position, i in enumerate(order):
            losses[i] = self.peer_losses(
                i, [features[i] if j == i else seen[j] for j in range(len(seen))], labels
            )
            self.manual_backward(losses[i]["loss"])
            self._prepare_update(i, losses[i])
            if position == len(order) - 1:
                self._finish_step()
            else:
                self.cohort.step_peer(i)
                self.cohort.zero_peer(i)
                seen[i] = self._features(i, batch, keep, grad=False)  # its predictions after the update
        return losses

    @property
    def cohort(self) -> PeerOptimizers:
        """The peers' optimizers (the one optimizer Lightning holds)."""
        optimizer: Any = self.optimizers(use_pl_optimizer=False)
        return optimizer

    def _features(self, index: int, batch: Batch, keep: Tensor, grad: bool) -> Tensor:
        """Peer ``index``'s final hidden states at the kept positions ``keep`` ``(B, T-1)``: ``(N, H_i)``."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.peer_forward(index, batch).last[:, :-1][keep]

    def _prepare_update(self, index: int, losses: Mapping[str, Tensor]) -> None:
        """Average (DDP), check and clip peer ``index``'s gradients; a non-finite loss term or gradient stops
        the run or (``skip``) drops them, so its update changes nothing."""
        peer = self.peers[index]
        if self._average_gradients:
            average_replicated_gradients(peer, None)  # the mean over the processes, as DDP would
        finite = torch.stack([torch.isfinite(v).all() for v in losses.values()]).tolist()  # one device sync
        bad = [name for name, ok in zip(losses, finite, strict=True) if not ok]
        grads = [p.grad for p in peer.parameters() if p.grad is not None]
        if self.trainer.strategy.reduce_boolean_decision(bool(bad) or not all_finite(grads), all=False):
            self._batch_failed = True
            what = f"loss terms {bad}" if bad else "gradients (or loss terms on another process)"
            self.guard.failed(self.global_step, f"peer{index} {what}", losses)  # raises under "stop"
            self.log("train/nonfinite_skips", float(self.guard.total), batch_size=1)
            self.cohort.zero_peer(index)
            return
        if self.gradient_clip_val:
            optimizer: Any = self.cohort.optimizers[index]
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    def _finish_step(self) -> None:
        """Lightning's one optimizer step of the batch: updates every peer still holding gradients."""
        optimizer: Any = self.optimizers()
        optimizer.step()
        self.cohort.zero_grad(set_to_none=True)

    def _log_training(self, losses: Mapping[int, Mapping[str, Tensor]], size: int) -> Tensor | None:
        values = {
            f"train/peer{i}/{name}": v.detach() for i, terms in losses.items() for name, v in terms.items()
        }
        total = torch.stack([terms["loss"].detach() for terms in losses.values()]).mean()
        self.log("train/loss", total, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict(values, batch_size=size, sync_dist=True)
        rates = {
            f"train/peer{i}/lr": opt.param_groups[0]["lr"] for i, opt in enumerate(self.cohort.optimizers)
        }
        self.log_dict(rates, batch_size=size)
        return None if self._batch_failed else total

    # ------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: Batch, stage: str) -> None:
        """Every peer's loss terms and metrics against the others' mixture, from the loss's chunk loop."""
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        features = [self._features(i, batch, keep, grad=False) for i in range(len(self.peers))]
        size = max(int(keep.sum()), 1)
        agreement: Any = self.agreement[stage]
        peer_metrics: Any = self.eval_metrics[stage]
        totals, ces = [], []
        for index, metrics in enumerate(peer_metrics):
            observe = _observer(metrics, agreement)
            losses = self.peer_losses(index, features, labels, observe)
            totals.append(losses["loss"])
            ces.append(losses["ce_loss"])
            self.log_dict(
                {f"{stage}/peer{index}/{k}": v for k, v in losses.items()}, batch_size=size, sync_dist=True
            )
            for name in ("ppl", "top1_agreement", "kl"):
                self.log(f"{stage}/peer{index}/{name}", getattr(metrics, name))
        self.log(f"{stage}/loss", torch.stack(totals).mean(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log(f"{stage}/ce_loss", torch.stack(ces).mean(), batch_size=size, sync_dist=True)
        self.log(f"{stage}/peer_agreement", agreement)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Per-position NLL of the next token of every peer, ``{"peer{i}": (B, T-1)}``, NaN where no token
        is predicted (the predictions writer makes ``peer0_nll`` ... columns of them)."""
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        features = [self._features(i, batch, keep, grad=False) for i in range(len(self.peers))]
        result = {}
        for index in range(len(self.peers)):
            nll = NextTokenNLL(keep, with_teacher=False)
            self.peer_losses(index, features, labels, nll.observe)
            result[f"peer{index}"] = nll.result()["student"]
        return result

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        optimizers = [
            make(peer.parameters()) for make, peer in zip(self.optimizer_factories, self.peers, strict=True)
        ]
        cohort = PeerOptimizers(optimizers)
        schedulers = [
            None if make is None else make(opt)
            for make, opt in zip(self.scheduler_factories, optimizers, strict=True)
        ]
        if all(scheduler is None for scheduler in schedulers):
            return cohort
        return {
            "optimizer": cohort,
            "lr_scheduler": {"scheduler": PeerSchedulers(cohort, schedulers), "interval": "step"},
        }

    # ------------------------------------------------------------------------------------------------ hooks
    def configure_callbacks(self) -> list[L.Callback]:
        """``RunState`` (checkpoints carry what export and resume need), ``TokenizerCheck`` (the data's
        tokenizer is every peer's) and ``ScheduleLengthCheck`` (each peer's schedule lasts the run)."""
        return [RunState(), TokenizerCheck(), ScheduleLengthCheck()]

    def on_fit_start(self) -> None:
        """Refuse what the cohort's per-peer updates cannot do (FSDP2, other multi-process strategies than
        DDP, a loss scaler), and peers whose logits the chunked heads would not reproduce."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) or (
            self.trainer.world_size > 1 and not isinstance(strategy, DDPStrategy)
        ):
            raise ConfigError(
                "trainer.strategy", type(strategy).__name__, "is not supported by MutualDistillationModule",
                "use one device or ddp",
            )  # fmt: skip
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError(
                "trainer.precision", self.trainer.precision,
                "scales the loss, which the per-peer updates do not undo", "use bf16-mixed or 32-true",
            )  # fmt: skip
        self._check_heads()

    def _switch_off_ddp_reducer(self) -> None:
        """Under DDP, keep DDP's reducer out of this step (as inside its ``no_sync()``): each peer's gradients
        are averaged just before its own update instead. Lightning sets the flag back after every step."""
        model = getattr(self.trainer.strategy, "model", None)
        self._average_gradients = isinstance(model, DistributedDataParallel)
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = False

    def on_validation_start(self) -> None:
        self._check_heads()

    on_test_start = on_predict_start = on_validation_start

    def _check_heads(self) -> None:
        if self._heads_checked or self.chunk_size is None:
            return
        for index in range(len(self.peers)):
            check_head(self.peers[index], self.peer_head(index), f"model.peers[{index}]")
        self._heads_checked = True


def _observer(metrics: EvaluationMetrics, agreement: TopKAgreement) -> ChunkObserver:
    """A chunk observer that updates a peer's metrics and the cohort's agreement."""

    def observe(rows: slice, logits: Tensor, target: TeacherChunk, labels: Tensor) -> None:
        metrics.observe(rows, logits, target, labels)
        assert isinstance(target, Tensor)  # a PeerMixture hands out (n, V) tensors
        agreement.update(logits, target)

    return observe
