"""Sharding student and teacher with FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``.

Each transformer block of both models (the classes a Hugging Face model lists in ``_no_split_modules``)
becomes its own FSDP unit over the data-parallel mesh: its weights live in shards, are gathered for the
block's forward and backward, and the student's gradients are reduce-scattered. Blocks hold nearly all the
weights of an LLM. Embeddings, final norm and output head stay whole on every process, because the
chunked loss reads the head directly, outside any forward; the student's are kept in step by averaging
their gradients over the processes (:func:`average_replicated_gradients`), as DDP would.

Usage: ``recipes/fsdp.yaml`` (GPUs), or ``--trainer.strategy ModelParallelStrategy`` with
``data_parallel_size`` = the number of processes and ``tensor_parallel_size: 1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor  # imported by Lightning already: no cost at import

from distilkit.errors import ConfigError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class it names in ``_no_split_modules`` (``GPT2Block``, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(
            "trainer.strategy",
            "ModelParallelStrategy",
            f"cannot shard a {type(model).__name__}: it names no transformer block in _no_split_modules",
            "use a Hugging Face causal LM, or DDP",
        )
    return blocks


def shard_blocks(model: nn.Module, mesh: Any, mp_policy: Any = None) -> int:
    """``fully_shard`` every transformer block of ``model`` over ``mesh``; returns how many were sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = transformer_blocks(model)
    for block in blocks:
        # explicit: each block is its own FSDP root, and a root left on its default keeps its weights whole
        # after forward (and a no-grad teacher's for good, as no backward reshards them)
        policy = mp_policy or MixedPrecisionPolicy()
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    return len(blocks)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter or its gradient)."""
    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def replicated_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Trainable parameters FSDP does not manage (embeddings, final norm, head)."""
    return (p for p in model.parameters() if p.requires_grad and not is_sharded(p))


def average_replicated_gradients(model: nn.Module, group: Any) -> None:
    """Average the gradients of the parameters every process keeps whole (one all-reduce of them all)."""
    grads = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat /= torch.distributed.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def clip_gradients(model: nn.Module, max_value: float, algorithm: str, group: Any) -> None:
    """Gradient clipping over sharded and whole gradients together (``clip_grad_norm_`` cannot mix them).

    ``norm``: the global L2 norm ``sqrt(sum of the shards' squares over the processes + the whole ones')``,
    and every gradient scaled by ``min(1, max_value / (norm + 1e-6))``, as ``clip_grad_norm_`` does.
    ``value``: every element clamped to ``[-max_value, max_value]``.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    if algorithm == "value":
        for grad in grads:
            local_shard(grad).clamp_(-max_value, max_value)
        return
    zero = torch.zeros((), device=local_shard(grads[0]).device)  # on the gradients' device (NCCL needs it)
    sharded = sum((local_shard(g).float().pow(2).sum() for g in grads if is_sharded(g)), zero)
    torch.distributed.all_reduce(sharded, group=group)  # the shards' squares, summed over processes
    whole = sum((g.float().pow(2).sum() for g in grads if not is_sharded(g)), zero)
    norm = (sharded + whole).sqrt()
    scale = (max_value / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        local_shard(grad).mul_(scale.to(grad.dtype))


def finite_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether the L2 norm of all the norms of ``tensors`` (local shards) is finite, as a boolean tensor on
    their device: no device sync. True proves every element finite; False means a bad value or an overflow
    of the squares (see :func:`all_finite`)."""
    return torch.isfinite(torch.stack(torch._foreach_norm([local_shard(t) for t in tensors]))).all()


def all_finite(tensors: list[torch.Tensor], norm_finite: bool | None = None) -> bool:
    """Whether every element of every tensor is finite, at the cost of one fused norm pass in the usual case.

    A finite L2 norm of all the norms means no NaN or inf anywhere; only a non-finite norm (a bad value, or
    an overflow of the squares) needs the exact element-wise check. Sharded tensors (FSDP2) are checked by
    their local shard; callers combine the processes' answers. ``norm_finite``: :func:`finite_norm` when the
    caller has read it already.
    """
    tensors = [local_shard(t) for t in tensors]
    if not tensors:
        return True
    if norm_finite is None:
        norm_finite = bool(finite_norm(tensors))
    return norm_finite or all(bool(torch.isfinite(t).all()) for t in tensors)


class ShardedTraining:
    """FSDP2 for a LightningModule (a mixin placed before ``L.LightningModule``): under Lightning's
    ``ModelParallelStrategy``, :meth:`configure_model` shards the transformer blocks of every model
    :meth:`models_to_shard` lists over the data-parallel processes; :meth:`configure_gradient_clipping`
    clips sharded and whole gradients together; :meth:`average_whole_gradients` (call it in
    ``on_before_optimizer_step``) averages the gradients FSDP does not manage, as DDP would."""

    _shard_group: Any = None  # the data-parallel process group once configure_model sharded
    device_mesh: Any
    strict_loading: bool

    def models_to_shard(self) -> dict[str, nn.Module]:
        """The models whose blocks are sharded, by name."""
        raise NotImplementedError

    def configure_model(self) -> None:
        mesh = self.device_mesh  # set by ModelParallelStrategy; None under any other strategy
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
        models = self.models_to_shard()
        counts = " and ".join(str(shard_blocks(model, data_parallel)) for model in models.values())
        where = f"over {data_parallel.size()} processes"
        rank_zero_info(f"distilkit: FSDP2 shards {counts} blocks ({', '.join(models)}) {where}")
        self._shard_group = data_parallel.get_group()
        self.strict_loading = False  # the strategy loads state itself; checkpoints hold no teacher

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, or under FSDP2 :func:`clip_gradients` (sharded and whole together)."""
        if self._shard_group is None or not gradient_clip_val:
            super().configure_gradient_clipping(  # type: ignore[misc]
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        model: Any = self
        clip_gradients(model, float(gradient_clip_val), gradient_clip_algorithm or "norm", self._shard_group)

    def average_whole_gradients(self) -> None:
        """Under FSDP2, average the gradients of the parameters every process keeps whole."""
        if self._shard_group is not None:
            model: Any = self
            average_replicated_gradients(model, self._shard_group)
