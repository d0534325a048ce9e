"""A resumable shuffled order, shared out over processes: the same data whether a run was interrupted, and
whether it runs on one process or several."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled item indices of one process, in whole batches, that a resumed run continues exactly.

    Epoch ``e`` shuffles the ``size`` items by ``randperm(size)`` seeded with ``seed + e`` and cuts the order
    into global batches of ``batch_size * num_replicas`` items (a last, partial one is dropped); process
    ``rank`` takes items ``[rank * batch_size, (rank + 1) * batch_size)`` of each. So one process with batch
    ``batch_size * num_replicas`` sees batch for batch the items that ``num_replicas`` processes see together.

    Lightning calls :meth:`set_epoch` before each epoch and, since this is a ``DistributedSampler``, leaves
    it in place under DDP. :meth:`resume_at` makes the next pass over epoch ``epoch`` skip the
    ``batches_done`` batches an interrupted run had finished.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        items: Any = range(size)  # DistributedSampler reads only the length of its dataset
        super().__init__(items, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size, self.batch_size = size, batch_size
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) for the next pass

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.num_replicas)

    def __len__(self) -> int:
        """Items this process takes in a whole epoch (a resumed pass yields fewer)."""
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            start = done if epoch == self.epoch else 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.num_replicas
        for batch in range(start, self.batches_per_epoch):
            first = batch * global_batch + self.rank * self.batch_size
            yield from order[first : first + self.batch_size].tolist()

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start the next pass over epoch ``epoch`` at its batch ``batches_done``."""
        self._resume = (epoch, batches_done)
