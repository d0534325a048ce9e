"""MutualDistillationModule: a cohort of peers that learn from the labels and from each other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from distilkit.batch import Batch, model_inputs, next_token_targets
from distilkit.errors import ConfigError, check_range
from distilkit.losses import DistillationLoss, ForwardKLLoss
from distilkit.losses.chunked import (
    ChunkObserver,
    HeadLossPlan,
    TeacherChunk,
    head_losses,
    resolve_chunk_size,
)
from distilkit.losses.workspace import Workspace
from distilkit.metrics import EvaluationMetrics, TopKAgreement
from distilkit.models.heads import BodyOutput, OutputHead, body_features, check_head, output_head
from distilkit.models.loading import ModelSpec
from distilkit.models.sharding import average_replicated_gradients
from distilkit.modules.base import DistillationBase, Scorer
from distilkit.modules.guards import NonFiniteGuard
from distilkit.modules.peer_optimizers import PeerOptimizers, PeerSchedulers
from distilkit.modules.peers import (
    CohortSettings,
    cohort_vocab_size,
    kd_ratios,
    load_peers,
    peer_index,
    refuse_unsupported_training,
    switch_off_ddp_reducer,
)
from distilkit.teachers.mixture import PeerMixture


class MutualDistillationModule(DistillationBase):
    """Deep mutual learning (Zhang et al. 2018) and online distillation (Anil et al. 2018): a cohort of two
    or more peers trained together, each on the labels and on the others' predictions.

    Peer i minimises ``(1 − kd_ratio_i)·CE_i + kd_ratio_i·KD(m_−i → peer i)``, where ``m_−i`` is the other
    peers' DETACHED distribution ``Σ_{j≠i} w_j·p_j / Σ_{j≠i} w_j``
    (:class:`~distilkit.teachers.mixture.PeerMixture`), formed chunk by chunk from their hidden states: no
    gradient crosses between peers and no ``(tokens, V)`` tensor is held whole. KD is any
    :class:`~distilkit.losses.DistillationLoss` (default forward KL). Peers may differ in size (a large peer
    is the online teacher of a small one) but share the tokenizer.

    ``update: alternate`` (DML's algorithm) updates the peers one after another on the same batch, each seeing
    the others' CURRENT predictions (the peers updated before it are run again, no grad); ``simultaneous``
    updates every peer from the same forward pass. ``order: rotate`` starts the alternate sequence at peer
    ``step mod P``. ``frozen_steps[i] = N`` keeps peer i frozen (eval mode, no grad, no update) for its first
    N steps; ``burn_in_steps = N`` trains every peer on the labels alone for the first N steps;
    ``kd_positions: peer_better`` lets a peer learn from the others only at positions whose next token their
    mixture gives more probability than the peer does (``kd_share`` logged). README's "Mutual and online
    distillation" section gives the costs and measurements.

    Each peer has its own optimizer and LR scheduler (``optimizer``/``lr_scheduler`` build one per peer,
    ``optimizers``/``lr_schedulers`` give one each), which Lightning sees as one
    :class:`~distilkit.modules.peer_optimizers.PeerOptimizers`, so ``trainer.global_step`` counts batches.
    Optimization is manual: clip with ``gradient_clip_val`` here (each peer by its own norm). Under DDP each
    peer's gradients are averaged just before its update; FSDP2 and ``16-mixed`` are refused.

    Logs ``train/loss`` (mean over the peers updated) and ``train/peer{i}/...`` per peer; ``val/peer{i}/...``
    (loss terms, ``ppl``, ``top1_agreement`` and ``kl`` against the others' mixture), ``val/loss`` and
    ``val/ce_loss`` (means over the peers) and ``val/peer_agreement``. ``distilkit export --peer N`` (or
    ``NAME``) writes one peer.

    Args:
        peers: two or more model specs, as for ``student:``.
        names: optional names of the peers, for ``export --peer NAME`` and knobs ``NAME.kd_ratio``.
        loss: the KD divergence, shared by every peer (default ``ForwardKLLoss()``).
        kd_ratio: weight of KD in each peer's total, one value or one per peer, in [0, 1] (default 0.5).
        weights: a positive weight per peer in the mixtures the others learn from (default equal).
        update: ``alternate`` or ``simultaneous``.
        order: ``fixed`` (peer order) or ``rotate`` for the alternate sequence.
        frozen_steps: per peer, the steps it stays frozen for (at least one peer trains from the start).
        burn_in_steps: the first steps in which every peer trains on the labels alone.
        kd_positions: ``all`` or ``peer_better``.
        chunk_size: tokens per chunk of the loss; ``"auto"`` from a byte budget; None unchunked.
        gradient_clip_val: clip each peer's gradient norm to this before its update (None: no clipping).
        nonfinite: ``stop`` at a non-finite loss term or gradient, or ``skip`` that peer's update.
        max_nonfinite_skips: with ``skip``, stop after this many skipped peer updates in a row.
        optimizer, optimizers: builds each peer's optimizer, or one factory per peer.
        lr_scheduler, lr_schedulers: builds each peer's LR scheduler, or one factory per peer; a length left
            out is the run's.
        vocab_size, block_size, eos_token_id: the tokenizer's (linked from the data module by the CLI).
    """

    #: ``kd_ratio`` (every peer); ``peer{i}.kd_ratio`` and ``NAME.kd_ratio`` set one (:meth:`knob_names`).
    knobs: ClassVar[tuple[str, ...]] = ("kd_ratio",)

    def __init__(
        self,
        peers: list[ModelSpec],
        names: list[str] | None = None,
        loss: DistillationLoss | None = None,
        kd_ratio: float | list[float] = 0.5,
        weights: list[float] | None = None,
        update: Literal["alternate", "simultaneous"] = "alternate",
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
        self.settings = CohortSettings.check(
            len(peers), names=names, kd_ratio=kd_ratio, weights=weights, update=update, order=order,
            frozen_steps=frozen_steps, burn_in_steps=burn_in_steps, kd_positions=kd_positions,
            gradient_clip_val=gradient_clip_val,
        )  # fmt: skip
        self.names, self.kd_ratios = self.settings.names, list(self.settings.kd_ratios)
        models = load_peers(peers, vocab_size=vocab_size, block_size=block_size, eos_token_id=eos_token_id)
        self.peers = nn.ModuleList(models)
        self.vocab_size = cohort_vocab_size(models, vocab_size)
        self.chunk_size = resolve_chunk_size(chunk_size, self.vocab_size)
        self.loss = loss if loss is not None else ForwardKLLoss()
        self.guard = NonFiniteGuard(nonfinite, max_nonfinite_skips)
        self.optimizer_factories = self.settings.per_peer("model.optimizers", optimizers or optimizer)
        self.scheduler_factories = self.settings.per_peer(
            "model.lr_schedulers", lr_schedulers or lr_scheduler
        )
        self.scheduler_fields = [
            f"model.lr_schedulers[{i}]" if lr_schedulers else "model.lr_scheduler" for i in range(len(peers))
        ]
        self.init_evaluation(scored=len(models))
        self.agreement = nn.ModuleDict({stage: TopKAgreement(k=1) for stage in ("val", "test")})
        self.workspace = Workspace()
        self._average_gradients = False  # set under DDP (each training step)
        self._batch_failed = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, peer: int = 0) -> Tensor:
        """Logits ``(B, T, V)`` of peer ``peer`` for ``(B, T)`` token ids."""
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.peer_head(peer)(self.peer_forward(peer, {"input_ids": input_ids} | mask).last)

    # ----------------------------------------------------------------------------------------------- pieces
    def peer_forward(self, index: int, batch: Batch) -> BodyOutput:
        """Peer ``index``'s final hidden states ``(B, T, H_i)`` (gradients as the caller's context allows)."""
        return body_features(self.peers[index], **model_inputs(batch), output_hidden_states=False)

    def peer_head(self, index: int) -> OutputHead:
        return output_head(self.peers[index], self.vocab_size)

    def targets_for(self, index: int, features: Sequence[Tensor]) -> PeerMixture:
        """What peer ``index`` learns from: the detached mixture of the other peers' distributions, from
        their features ``(N, H_j)`` at the valid positions."""
        others = [j for j in range(len(self.peers)) if j != index]
        return PeerMixture.of(
            [features[j] for j in others],
            [self.peer_head(j) for j in others],
            [self.settings.weights[j] for j in others],
        )

    def peer_terms(self, student_logits: Tensor, target: TeacherChunk, labels: Tensor) -> dict[str, Tensor]:
        """CE on the labels and KD against the others' mixture, each a mean over the ``(n, V)`` chunk.

        With ``kd_positions: peer_better`` KD is ``(1/n)·Σ_t g_t·KD_t``, where ``g_t = 1`` at the positions
        whose next token the mixture gives more probability than the peer does (``kd_share``: the mean of g).
        """
        assert isinstance(target, Tensor)  # a PeerMixture hands out (n, V) tensors
        if self.settings.kd_positions == "all":
            kd, ce = self.loss.kd_and_ce(student_logits, target, labels)
            return {"ce_loss": ce, "kd_loss": kd}
        count = max(labels.numel(), 1)
        nll = F.cross_entropy(student_logits.float(), labels, reduction="none")  # (n,)
        target = target.float()  # (n, V) logits or log-probabilities: -log m(y) = logsumexp(t) - t_y
        target_nll = torch.logsumexp(target, -1) - target.gather(-1, labels[:, None]).squeeze(-1)  # (n,)
        better = target_nll < nll.detach()  # (n,) the others predict the next token better here
        gated = torch.where(better, labels, self.loss.ignore_index)
        kd = self.loss(student_logits, target, gated) * (better.sum() / count)
        return {"ce_loss": nll.sum() / count, "kd_loss": kd, "kd_share": better.float().mean()}

    def peer_losses(
        self, index: int, features: Sequence[Tensor], labels: Tensor, observer: ChunkObserver | None = None
    ) -> dict[str, Tensor]:
        """``{"loss": total, "ce_loss": ..., "kd_loss": ...}`` of peer ``index`` (total differentiable when
        its ``features[index]`` are), its target the others' ``features``."""
        burning_in = self.training and self.global_step < self.settings.burn_in_steps
        ratio = 0.0 if burning_in else self.kd_ratios[index]
        weights = {"ce_loss": 1.0 - ratio, "kd_loss": ratio}
        extra = ("kd_share",) if self.settings.kd_positions == "peer_better" else ()
        plan = HeadLossPlan(
            student_head=self.peer_head(index), teacher=self.targets_for(index, features), labels=labels,
            terms=self.peer_terms, names=(*weights, *extra), weights=weights, chunk_size=self.chunk_size,
            observer=observer, workspace=self.workspace,
        )  # fmt: skip
        return head_losses(features[index], plan)

    def is_frozen(self, index: int, step: int | None = None) -> bool:
        """Whether peer ``index`` is frozen at ``step`` (default: the current step)."""
        return (self.global_step if step is None else step) < self.settings.frozen_steps[index]

    def update_order(self, step: int) -> list[int]:
        """The peers updated at ``step``, in the order they are updated (frozen ones left out)."""
        trainable = [i for i in range(len(self.peers)) if not self.is_frozen(i, step)]
        if self.settings.order == "rotate" and trainable:
            start = step % len(trainable)
            trainable = trainable[start:] + trainable[:start]
        return trainable

    def knob_names(self) -> set[str]:
        """``kd_ratio``, ``peer{i}.kd_ratio`` and ``NAME.kd_ratio`` per peer, and the loss's knobs."""
        labels = {label for i, name in enumerate(self.names) for label in (f"peer{i}", name)}
        return super().knob_names() | {f"{label}.kd_ratio" for label in labels}

    @property
    def kd_ratio(self) -> list[float]:
        """Each peer's KD weight (the ``kd_ratio`` knob sets one value for every peer)."""
        return list(self.kd_ratios)

    @kd_ratio.setter
    def kd_ratio(self, value: float | Sequence[float]) -> None:
        self.kd_ratios = kd_ratios("kd_ratio", value, len(self.peers))

    def set_knob(self, name: str, value: float) -> bool:
        index = peer_index(name.removesuffix(".kd_ratio"), self.names) if name.endswith(".kd_ratio") else None
        if index is not None:
            self.kd_ratios[index] = check_range(name, float(value), 0.0, 1.0)
        return index is not None or super().set_knob(name, value)

    def exportable_models(self) -> dict[str, nn.Module]:
        """Every peer, by its state-dict prefix (``peers.0`` ...), for ``distilkit export --peer N``."""
        return {f"peers.{i}": peer for i, peer in enumerate(self.peers)}

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        self._average_gradients = switch_off_ddp_reducer(self.trainer)
        step = self.global_step
        order = self.update_order(step)
        for index, peer in enumerate(self.peers):
            peer.train(not self.is_frozen(index, step))  # a frozen peer predicts as a teacher does
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        features = [self._features(i, batch, keep, grad=i in order) for i in range(len(self.peers))]
        self._batch_failed = False
        updates = self._simultaneous if self.settings.update == "simultaneous" else self._alternate
        losses = updates(batch, keep, labels, features, order)
        total = self._log_training(losses, batch["input_ids"].shape[0])  # the rates this step used
        scheduler: Any = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
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
        self.guard.watch(losses, 1)
        grads = [p.grad for p in peer.parameters() if p.grad is not None]
        if self.guard.check(self.trainer.strategy, self.global_step, grads, who=self.names[index]) is None:
            self._batch_failed = True  # "stop" raised in check
            self.log("train/nonfinite_skips", float(self.guard.total), batch_size=1)
            self.cohort.zero_peer(index)
            return
        if self.settings.gradient_clip_val:
            optimizer: Any = self.cohort.optimizers[index]
            self.clip_gradients(
                optimizer, gradient_clip_val=self.settings.gradient_clip_val, gradient_clip_algorithm="norm"
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
    def scorers(self, batch: Batch) -> dict[str, Scorer]:
        """Every peer, scored against the others' mixture (their features computed once for all)."""
        keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
        features = [self._features(i, batch, keep, grad=False) for i in range(len(self.peers))]
        return {f"peer{i}": partial(self.peer_losses, i, features, labels) for i in range(len(self.peers))}

    def observer(self, stage: str, index: int, metrics: EvaluationMetrics) -> ChunkObserver:
        """A peer's metrics, and the cohort's agreement with the others' mixture."""
        agreement: Any = self.agreement[stage]

        def observe(rows: slice, logits: Tensor, target: TeacherChunk, labels: Tensor) -> None:
            metrics.observe(rows, logits, target, labels)
            assert isinstance(target, Tensor)  # a PeerMixture hands out (n, V) tensors
            agreement.update(logits, target)

        return observe

    def evaluated(self, stage: str, results: Mapping[str, Mapping[str, Tensor]], size: int) -> None:
        """``{stage}/loss`` and ``{stage}/ce_loss``, means over the peers, and ``{stage}/peer_agreement``."""
        for name, prog_bar in (("loss", True), ("ce_loss", False)):
            mean = torch.stack([losses[name] for losses in results.values()]).mean()
            self.log(f"{stage}/{name}", mean, prog_bar=prog_bar, batch_size=size, sync_dist=True)
        agreement: Any = self.agreement[stage]
        self.log(f"{stage}/peer_agreement", agreement)

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        built = [
            self.optimizer_and_scheduler(make_optimizer, make_scheduler, peer.parameters())
            for make_optimizer, make_scheduler, peer in zip(
                self.optimizer_factories, self.scheduler_factories, self.peers, strict=True
            )
        ]
        cohort = PeerOptimizers([optimizer for optimizer, _ in built])
        schedulers = [scheduler for _, scheduler in built]
        if all(scheduler is None for scheduler in schedulers):
            return cohort
        return {
            "optimizer": cohort,
            "lr_scheduler": {"scheduler": PeerSchedulers(cohort, schedulers), "interval": "step"},
        }

    # ------------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        """Refuse what the cohort's per-peer updates cannot do, and peers whose logits the chunked heads would
        not reproduce."""
        refuse_unsupported_training(self.trainer)
        super().on_fit_start()

    def check_heads(self) -> None:
        for index, peer in enumerate(self.peers):
            check_head(peer, self.peer_head(index), f"model.peers[{index}]")
