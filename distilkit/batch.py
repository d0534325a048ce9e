"""The batch every part of distilkit shares: the Hugging Face causal-LM convention.

A batch is a dict of ``(B, T)`` tensors: ``input_ids``, ``attention_mask`` and ``labels``, where labels equal
the inputs and :data:`IGNORE_INDEX` marks positions that are not predicted (padding). Models see the
inputs as they are; the next-token shift happens once, in :func:`next_token_targets`.
"""

from __future__ import annotations

from collections.abc import Mapping

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
