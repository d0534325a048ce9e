"""A resumable shuffled batch order: the same batches in the same order, whether a run was interrupted."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` indices out of ``size`` (the last partial batch dropped).

    Epoch ``e`` uses the permutation seeded by ``seed + e``, so the order is a function of the epoch
    alone. :meth:`resume_at` makes the next iteration start ``batches_done`` batches into epoch
    ``epoch``: what a run killed mid-epoch needs to neither repeat nor skip a batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch = -1  # the epoch being iterated (-1: none yet)
        self._next: tuple[int, int] | None = None  # (epoch, first batch) of the next iteration

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self._next if self._next is not None else (self.epoch + 1, 0)
        self._next = None
        if start >= len(self):  # the checkpoint was taken at the end of that epoch
            epoch, start = epoch + 1, 0
        self.epoch = epoch
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        for batch in range(start, len(self)):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start the next iteration at batch ``batches_done`` of epoch ``epoch``."""
        self.epoch = epoch - 1
        self._next = (epoch, batches_done)
