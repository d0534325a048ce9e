"""The peers of a cohort: loading them, the logit width they share, and the cohort's settings, checked."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distilkit.errors import ConfigError, check_range
from distilkit.models.loading import ModelSpec, check_context, load_causal_lm, vocab_rows


def load_peers(
    specs: Sequence[ModelSpec], *, vocab_size: int | None, block_size: int | None, eos_token_id: int | None
) -> list[nn.Module]:
    """Every peer in float32 and train mode; config mappings get the tokenizer's vocabulary size, ids and
    ``block_size`` positions where they leave them out (as the student of a distillation does)."""
    defaults = {"vocab_size": vocab_size, "max_position_embeddings": block_size}
    defaults |= {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    models = []
    for index, spec in enumerate(specs):
        field = f"model.peers[{index}]"
        model = load_causal_lm(spec, field=field, dtype=torch.float32, defaults=defaults)
        check_context(field, model, block_size)
        models.append(model.train())  # from_pretrained returns eval-mode models
    return models


def cohort_vocab_size(models: Sequence[nn.Module], tokenizer_size: int | None) -> int:
    """The logit width the peers are compared on: their head size when all agree, else the tokenizer's
    (rows beyond it are padding); every peer must cover the tokenizer."""
    rows = [vocab_rows(model) for model in models]
    for index, width in enumerate(rows):
        if tokenizer_size is not None and tokenizer_size > width:
            raise ConfigError(
                f"model.peers[{index}]",
                f"vocabulary of {width}",
                f"is smaller than the tokenizer's {tokenizer_size}",
                "leave vocab_size out of its config mapping (the tokenizer's is filled in)",
            )
    if len(set(rows)) == 1:
        return rows[0]
    if tokenizer_size is not None:
        return tokenizer_size
    raise ConfigError("model.peers", rows, "have different vocabulary sizes", "give every peer one tokenizer")


def per_peer(field: str, value: Any, count: int) -> list[Any]:
    """``value`` as one entry per peer: a list must have ``count`` entries; anything else is repeated."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ConfigError(
            field, list(value), f"has {len(value)} entries for {count} peers", "give one per peer"
        )
    return list(value)


def peer_names(names: list[str] | None, count: int) -> list[str]:
    """The peers' names: ``peer0``, ``peer1`` ... unless given (distinct; ``peerN`` only for peer N)."""
    if names is None:
        return [f"peer{i}" for i in range(count)]
    names = per_peer("model.names", names, count)
    clash = [n for i, n in enumerate(names) if re.fullmatch(r"peer\d+", n) and n != f"peer{i}"]
    if len(set(names)) != count or clash:
        raise ConfigError("model.names", names, "must be distinct names", "name each peer once (not peerN)")
    return names


def kd_ratios(field: str, kd_ratio: float | Sequence[float], count: int) -> list[float]:
    """Each of ``count`` peers' KD weight in [0, 1], from one value for all or one per peer."""
    return [check_range(field, float(r), 0.0, 1.0) for r in per_peer(field, kd_ratio, count)]


def peer_index(label: str, names: Sequence[str]) -> int | None:
    """The index of the peer called ``label`` (its name or ``peer{i}``), or None."""
    if label in names:
        return list(names).index(label)
    found = re.fullmatch(r"peer(\d+)", label)
    return int(found.group(1)) if found and int(found.group(1)) < len(names) else None


@dataclass(frozen=True)
class CohortSettings:
    """A cohort's settings, each checked (one line naming the field when a value is wrong), per peer where
    they are given per peer (see :class:`~distilkit.MutualDistillationModule` for their meaning)."""

    count: int
    names: list[str]
    kd_ratios: list[float]
    weights: list[float]
    frozen_steps: list[int]
    burn_in_steps: int
    update: str
    order: str
    kd_positions: str
    gradient_clip_val: float | None

    @classmethod
    def check(
        cls,
        count: int,
        *,
        names: list[str] | None,
        kd_ratio: float | list[float],
        weights: list[float] | None,
        frozen_steps: list[int] | None,
        burn_in_steps: int,
        update: str,
        order: str,
        kd_positions: str,
        gradient_clip_val: float | None,
    ) -> CohortSettings:
        ratios = kd_ratios("model.kd_ratio", kd_ratio, count)
        peer_weights = [
            float(w) for w in per_peer("model.weights", 1.0 if weights is None else weights, count)
        ]
        if not all(w > 0 for w in peer_weights):
            raise ConfigError("model.weights", weights, "must all be positive", "give each peer a weight > 0")
        frozen = per_peer("model.frozen_steps", frozen_steps or 0, count)
        if any(n < 0 for n in frozen) or min(frozen) > 0:
            raise ConfigError(
                "model.frozen_steps",
                frozen_steps,
                "must be >= 0 with at least one 0",
                "let a peer train at once",
            )
        if burn_in_steps < 0:
            raise ConfigError("model.burn_in_steps", burn_in_steps, "must be >= 0", "use 0 for no burn-in")
        for field, value, choices in (
            ("model.update", update, ("alternate", "simultaneous")),
            ("model.order", order, ("fixed", "rotate")),
            ("model.kd_positions", kd_positions, ("all", "peer_better")),
        ):
            if value not in choices:
                raise ConfigError(field, value, "is not a choice", f"use {' or '.join(choices)}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ConfigError("model.gradient_clip_val", gradient_clip_val, "must be positive", "or null")
        return cls(
            count, peer_names(names, count), ratios, peer_weights, frozen, burn_in_steps, update, order,
            kd_positions, gradient_clip_val,
        )  # fmt: skip

    def per_peer(self, field: str, value: Any) -> list[Any]:
        """``value`` as one entry per peer (see :func:`per_peer`)."""
        return per_peer(field, value, self.count)


def refuse_unsupported_training(trainer: Any) -> None:
    """Refuse what a cohort's per-peer updates cannot do: FSDP2 and other multi-process strategies than DDP,
    and a loss scaler (``16-mixed``)."""
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy) or (
        trainer.world_size > 1 and not isinstance(strategy, DDPStrategy)
    ):
        raise ConfigError(
            "trainer.strategy", type(strategy).__name__, "is not supported by MutualDistillationModule",
            "use one device or ddp",
        )  # fmt: skip
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ConfigError(
            "trainer.precision", trainer.precision,
            "scales the loss, which the per-peer updates do not undo", "use bf16-mixed or 32-true",
        )  # fmt: skip


def switch_off_ddp_reducer(trainer: Any) -> bool:
    """Under DDP, keep DDP's reducer out of this step (as inside its ``no_sync()``): each peer's gradients are
    averaged just before its own update instead (Lightning sets the flag back after every step). Returns
    whether the run is under DDP."""
    model = getattr(trainer.strategy, "model", None)
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = False
        return True
    return False
