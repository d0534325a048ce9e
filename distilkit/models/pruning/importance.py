"""How much each block, head, MLP channel and hidden channel of a teacher matters, for cutting a student.

Two measures of width importance (higher keeps), both reported per teacher block in the shared shapes of
:mod:`.layouts` (H hidden, N heads, G key/value heads, D head dimension, I MLP channels):

* **activation** (Minitron, Muralidharan et al. 2024): mean absolute activation over the valid tokens of
  calibration batches: of each head's output dimension (the input of the attention output projection),
  of each MLP channel (the input of the MLP output projection), and of each hidden channel at the output
  of every norm (summed over the norms). For families that cut the head dimension, each query/key
  dimension scores mean|q_d| · mean|k_d|.
* **magnitude**: weight norms, no data. A head's value dimension d scores ‖W_v[d]‖ · ‖W_o[:, d]‖ (a
  head's output is a convex mix of its values, so this bounds its size); a query/key dimension
  ‖W_q[d]‖ · ‖W_k[d]‖; an MLP channel the norm of the weights that feed it times the norm of the weights
  it feeds; a hidden channel the sum of squares of every weight indexed by it. Biases are left out of the
  head and MLP scores.

Depth importance, two ways:

* **influence**: the block influence of ShortGPT (Men et al. 2024) and Minitron: the mean over valid tokens
  of 1 − cos(x, y) between a block's input x and output y. A block that barely turns its input scores near
  0 and is the first to go. One pass over the data, but blind to what later blocks make of a change.
* **loss**: what dropping blocks does to the model's own next-token loss (Minitron's perplexity ranking),
  by greedy backward elimination: from all blocks, repeatedly drop the one whose removal raises the mean
  cross-entropy on the data least, until the target count remain (:func:`drop_by_loss`). It costs
  L + (L − 1) + ... + (k + 1) passes over the data to keep k of L blocks, and sees interactions that a
  score per block cannot (after one block goes, its neighbour may matter more).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from distilkit.errors import ConfigError
from distilkit.models.pruning.layouts import BlockWeights, Layout, StateDict


@dataclasses.dataclass
class LayerScores:
    """Importance of one teacher block's prunable units (higher keeps).

    Attributes:
        heads: (N, D) per query head and value dimension; a head scores the sum over D.
        neurons: (I,) per MLP channel.
        channels: (H,) this block's part of each hidden channel's score.
        qk: (N, D) per query/key dimension, for families that cut the head dimension; else None.
    """

    heads: Tensor
    neurons: Tensor
    channels: Tensor
    qk: Tensor | None = None


@dataclasses.dataclass
class Scores:
    """Width importance of a whole teacher.

    Attributes:
        layers: one :class:`LayerScores` per teacher block.
        channels: (H,) the hidden channels' score from outside the blocks (activation: the final norm;
            magnitude: embeddings, head and final norm).
        block_influence: (L,) mean 1 − cos(block input, block output) per block, or None without data.
    """

    layers: list[LayerScores]
    channels: Tensor
    block_influence: Tensor | None = None


# -- activation ---------------------------------------------------------------------------------------


def measure_activations(
    model: PreTrainedModel, layout: Layout, head_dim: int, batches: Iterable[Mapping[str, Any]], *, field: str
) -> Scores:
    """Run ``model`` over ``batches`` and return activation scores and block influence.

    Args:
        model: the teacher (a Hugging Face causal LM of ``layout``'s family); left as it was found.
        layout: the family's layout (module paths).
        head_dim: D, to split head outputs per head.
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T) (1 = a real token).
        field: the config field the batches came from, named in errors.

    Raises:
        ConfigError: a batch is not a dict of (B, T) tensors, or the batches hold no valid token.
    """
    recorder = _Recorder(model, layout, head_dim)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                input_ids, mask = _batch_tensors(batch, field, _device(model))
                recorder.mask = mask.reshape(-1).bool()  # (B·T,)
                recorder.tokens += int(recorder.mask.sum())
                model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        recorder.remove()
        model.train(was_training)
    if recorder.tokens == 0:
        raise ConfigError(field, "no tokens", "the calibration batches hold no valid token", "give some text")
    return recorder.scores(layout)


class _Recorder:
    """Forward hooks that sum |activation| (and block influence) over the valid tokens of each batch."""

    def __init__(self, model: PreTrainedModel, layout: Layout, head_dim: int) -> None:
        self.sums: dict[tuple[str, int], Tensor] = {}
        self.tokens = 0
        self.mask = torch.zeros(0, dtype=torch.bool)
        self.head_dim = head_dim
        self.split_qk = layout.split_qk
        self._inputs: dict[int, Tensor] = {}
        blocks = cast(nn.ModuleList, model.get_submodule(layout.blocks))
        self.blocks = len(blocks)
        hooks = []
        for i, block in enumerate(blocks):
            hooks.append(
                block.get_submodule(layout.attn_out).register_forward_pre_hook(
                    partial(self._input, "heads", i)
                )
            )
            hooks.append(
                block.get_submodule(layout.mlp_out).register_forward_pre_hook(
                    partial(self._input, "neurons", i)
                )
            )
            for name in layout.norms:
                hooks.append(
                    block.get_submodule(name).register_forward_hook(partial(self._output, "channels", i))
                )
            if layout.cuts_head_dim:
                hooks.append(block.get_submodule(layout.attn_qkv).register_forward_hook(partial(self._qk, i)))
            hooks.append(block.register_forward_pre_hook(partial(self._block_in, i), with_kwargs=True))
            hooks.append(block.register_forward_hook(partial(self._block_out, i)))
        final = model.get_submodule(layout.final_norm)
        hooks.append(final.register_forward_hook(partial(self._output, "final", 0)))
        self.hooks = hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _rows(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (valid tokens, C) in float32."""
        return x.reshape(self.mask.numel(), -1)[self.mask].float()

    def _add(self, kind: str, i: int, value: Tensor) -> None:
        key = (kind, i)
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _input(self, kind: str, i: int, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._add(kind, i, self._rows(args[0]).abs().sum(0))

    def _output(self, kind: str, i: int, module: nn.Module, args: Any, output: Tensor) -> None:
        self._add(kind, i, self._rows(output).abs().sum(0))

    def _qk(self, i: int, module: nn.Module, args: Any, output: Tensor) -> None:
        q, k = self.split_qk(output, self.head_dim)  # (B, T, N, D) each
        self._add("q", i, self._rows(q).abs().sum(0))
        self._add("k", i, self._rows(k).abs().sum(0))

    def _block_in(self, i: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._inputs[i] = args[0] if args else kwargs["hidden_states"]

    def _block_out(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        y = output[0] if isinstance(output, tuple) else output
        x = self._inputs.pop(i)
        cos = F.cosine_similarity(self._rows(x), self._rows(y), dim=-1)  # (valid tokens,)
        self._add("influence", i, (1 - cos).sum())

    def scores(self, layout: Layout) -> Scores:
        """Means over the valid tokens seen, in the shapes of :class:`Scores`."""
        mean = {key: value / self.tokens for key, value in self.sums.items()}
        layers = []
        for i in range(self.blocks):
            qk = None
            if layout.cuts_head_dim:
                qk = (mean[("q", i)] * mean[("k", i)]).unflatten(0, (-1, self.head_dim))  # (N, D)
            layers.append(
                LayerScores(
                    heads=mean[("heads", i)].unflatten(0, (-1, self.head_dim)),  # (N, D)
                    neurons=mean[("neurons", i)],
                    channels=mean[("channels", i)],
                    qk=qk,
                )
            )
        influence = torch.stack([mean[("influence", i)] for i in range(self.blocks)])  # (L,)
        return Scores(layers=layers, channels=mean[("final", 0)], block_influence=influence)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch_tensors(batch: Any, field: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` (ones when absent), both (B, T), checked and on ``device``."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor) or ids.ndim != 2:
        shown = (
            type(batch).__name__ if ids is None else f"input_ids of shape {tuple(getattr(ids, 'shape', ()))}"
        )
        raise ConfigError(
            field,
            shown,
            "each calibration batch must be a dict with input_ids of shape (B, T)",
            "pass such batches",
        )
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ConfigError(
            field,
            f"attention_mask of shape {tuple(getattr(mask, 'shape', ()))}",
            f"must have the shape of input_ids {tuple(ids.shape)}",
            "pass a (B, T) mask or none",
        )
    return ids.to(device), mask.to(device)


# -- depth by loss ------------------------------------------------------------------------------------


def drop_by_loss(
    model: PreTrainedModel, layout: Layout, batches: list[Mapping[str, Any]], keep: int, *, field: str
) -> tuple[list[int], list[tuple[int, float]], float]:
    """Greedy backward elimination of blocks by the model's next-token loss on ``batches``.

    Returns:
        The ``keep`` blocks left (increasing), the dropped blocks in the order dropped with the mean
        cross-entropy (nats per token) of the model without them, and the loss of the whole model.
    """
    blocks = cast(nn.ModuleList, model.get_submodule(layout.blocks))
    data = [_batch_tensors(batch, field, _device(model)) for batch in batches]
    skipped: set[int] = set()
    hooks = [
        block.register_forward_hook(partial(_skip_if, skipped, i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    was_training = model.training
    model.eval()
    try:
        full = _mean_loss(model, data, field)
        dropped: list[tuple[int, float]] = []
        while len(blocks) - len(skipped) > keep:
            losses = {}
            for i in (i for i in range(len(blocks)) if i not in skipped):
                skipped.add(i)
                losses[i] = _mean_loss(model, data, field)
                skipped.remove(i)
            best = min(losses, key=lambda i: (losses[i], i))  # ties: the lower index goes first
            skipped.add(best)
            dropped.append((best, losses[best]))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [i for i in range(len(blocks)) if i not in skipped], dropped, full


def _skip_if(skipped: set[int], i: int, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    """A forward hook that makes block ``i`` the identity while it is in ``skipped``."""
    if i not in skipped:
        return None
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


@torch.no_grad()
def _mean_loss(model: PreTrainedModel, data: list[tuple[Tensor, Tensor]], field: str) -> float:
    """Mean next-token cross-entropy over the valid positions (both tokens real) of ``data``."""
    total, count = 0.0, 0
    for ids, mask in data:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()  # (B, T-1)
        total += float(F.cross_entropy(logits[valid].float(), ids[:, 1:][valid], reduction="sum"))
        count += int(valid.sum())
    if count == 0:
        raise ConfigError(field, "no tokens", "the calibration batches hold no valid token", "give some text")
    return total / count


# -- magnitude ----------------------------------------------------------------------------------------


def magnitude_scores(block: BlockWeights) -> LayerScores:
    """Weight-norm scores of one block (formulas in the module docstring), in float32."""
    q, k, v, o = (t.float() for t in (block.q, block.k, block.v, block.o))
    group = q.shape[0] // k.shape[0]  # query heads per key/value head
    heads = v.norm(dim=2).repeat_interleave(group, 0) * o.norm(dim=0)  # (N, D)
    qk = q.norm(dim=2) * k.norm(dim=2).repeat_interleave(group, 0)  # (N, D)
    mlp_in = [w.float() for w in block.mlp_in.values()]  # (I, H) each
    mlp_out = block.mlp_out.float()  # (H, I)
    fan_in = torch.stack([w.pow(2).sum(1) for w in mlp_in]).sum(0).sqrt()  # (I,)
    neurons = fan_in * mlp_out.norm(dim=0)
    channels = (
        q.pow(2).sum((0, 1))
        + k.pow(2).sum((0, 1))
        + v.pow(2).sum((0, 1))
        + o.pow(2).sum((1, 2))
        + sum(w.pow(2).sum(0) for w in mlp_in)
        + mlp_out.pow(2).sum(1)
        + sum(t.float().pow(2) for t in block.vectors.values())
    )  # (H,)
    return LayerScores(heads=heads, neurons=neurons, channels=channels, qk=qk)


def magnitude_outside_blocks(sd: StateDict, layout: Layout) -> Tensor:
    """(H,) sum of squares of the embeddings, LM head (once when tied) and final norm, per hidden channel."""
    seen: set[int] = set()
    total: Tensor | None = None
    for name in (*layout.matrices, *layout.final_vectors):
        if name not in sd or sd[name].data_ptr() in seen:
            continue
        seen.add(sd[name].data_ptr())
        t = sd[name].float().pow(2)
        part = t.sum(0) if t.ndim == 2 else t  # (V, H) -> (H,)
        total = part if total is None else total + part
    assert total is not None, "a layout names no model-level weight"
    return total
