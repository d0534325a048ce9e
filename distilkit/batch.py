"""The batch every part of distilkit shares: the Hugging Face causal-LM convention.

A batch is a dict of ``(B, T)`` tensors: ``input_ids``, ``attention_mask`` and ``labels``, where labels equal
the inputs and :data:`IGNORE_INDEX` marks positions that are not predicted (padding). Models see the
inputs as they are; the next-token shift happens once, in :func:`next_token_targets`.

Packed conversations (chat data) add ``position_ids``, restarting at 0 at every conversation of a row
and at its padding (attention never crosses a conversation: :mod:`distilkit.models.packing`), and
``assistant_mask``, true on the assistant's tokens (each reply's content and end-of-turn token), from
which :func:`assistant_replies` finds every reply and the prompt before it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Batch = Mapping[str, Tensor]

#: The fields of a batch a model's forward takes (``labels`` and bookkeeping such as ``block_index`` are not).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")

#: Label of a position that is not predicted (the Hugging Face and PyTorch convention).
IGNORE_INDEX = -100


def next_token_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Which positions predict a token, and which token.

    Position t of a block predicts token t + 1, so the features at ``[:, :-1]`` are compared with the
    labels at ``[:, 1:]``; positions whose target is :data:`IGNORE_INDEX` are dropped.

    Args:
        labels: ``(B, T)`` labels.

    Returns:
        ``keep``: ``(B, T-1)`` boolean, true where position t has a target; ``targets``: ``(N,)`` the
        targets at those positions, in row-major order (N = ``keep.sum()``).
    """
    shifted = labels[:, 1:]  # (B, T-1)
    keep = shifted != IGNORE_INDEX  # (B, T-1)
    return keep, shifted[keep]


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    """The fields of ``batch`` a model's forward takes (:data:`MODEL_INPUTS` that are present)."""
    return {name: batch[name] for name in MODEL_INPUTS if batch.get(name) is not None}


def assistant_replies(batch: Batch) -> Tensor:
    """Every assistant reply of a packed chat batch, with the prompt it answers.

    Returns:
        ``(R, 4)`` long, one row per reply in row-major order: ``(row, prompt_start, reply_start,
        reply_end)``. ``input_ids[row, prompt_start:reply_start]`` is the conversation before the reply
        through the template's generation prompt (what a model is given to write the reply) and
        ``input_ids[row, reply_start:reply_end]`` the reply, its end-of-turn token last (unless the
        conversation was truncated inside it).
    """
    mask = batch["assistant_mask"].bool()  # (B, T)
    edges = torch.nn.functional.pad(mask, (1, 1))  # (B, T + 2): False on both sides
    starts = mask & ~edges[:, :-2]  # (B, T): a reply's first token
    lasts = mask & ~edges[:, 2:]  # (B, T): a reply's last token
    rows, first = starts.nonzero(as_tuple=True)
    _, last = lasts.nonzero(as_tuple=True)
    prompt_start = first - batch["position_ids"][rows, first]  # the conversation's first token
    return torch.stack([rows, prompt_start, first, last + 1], dim=1)
