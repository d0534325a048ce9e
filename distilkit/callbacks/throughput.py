"""Training throughput: unpadded tokens per second, logged through Lightning's ``ThroughputMonitor``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Unpadded tokens in a batch (the attention mask's sum, or every position without a mask)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` set up for distilkit batches: ``train/device/items_per_sec`` is
    unpadded tokens per second on each device, ``train/device/samples_per_sec`` blocks per second,
    averaged over the last ``window_size`` steps."""

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=batch_tokens, window_size=window_size)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Training throughput only: Lightning's would log validation rates at validation batch counts, steps
        that run behind the training step (validation time is still left out of the training rate)."""
