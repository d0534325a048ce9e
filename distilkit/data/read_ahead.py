"""A data loader read a few batches ahead of the loop that consumes it, so that work on the next batches (a
teacher's server scoring them) runs while the current one trains.

:class:`ReadAhead` wraps any iterable of batches. Asked for batch i, it first reads batches up to i + depth
from the wrapped loader, handing each to ``on_read`` as soon as it is read (the moment to start work on it),
then calls ``on_yield`` on batch i (the moment to wait for that work) and yields it::

    loader = ReadAhead(data.train_dataloader(), depth=2, on_read=submit, on_yield=wait)

The batches come out in the loader's order, each once; nothing is read before the first one is asked for (a
check that calls ``iter()`` starts no workers). ``len()`` and the loader's attributes (``sampler``,
``batch_sampler``, ``dataset`` ...) are the wrapped loader's, so a trainer that sets the sampler's epoch or
counts batches sees the loader itself. An exception from ``on_yield`` surfaces where the loop asks for the
batch: between two steps, before anything of that batch ran.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """``loader``'s batches, each read ``depth`` batches before it is yielded.

    Args:
        loader: the batches (a ``DataLoader`` or any iterable).
        depth: how many batches beyond the one being consumed are read (0: none; ``on_yield`` still runs
            before each batch is handed out).
        on_read: called with each batch as soon as it is read from ``loader``.
        on_yield: called with each batch just before it is yielded (it may wait, or raise).
    """

    def __init__(
        self,
        loader: Iterable[T],
        depth: int,
        on_read: Callable[[T], object],
        on_yield: Callable[[T], object] | None = None,
    ) -> None:
        if not (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0):
            raise ValueError(f"depth should be an integer >= 0, got {depth!r}")
        self.loader, self.depth, self.on_read, self.on_yield = loader, depth, on_read, on_yield

    def __iter__(self) -> Iterator[T]:
        iterator: Iterator[T] | None = None
        window: deque[T] = deque()
        exhausted = False
        while True:
            if iterator is None:
                iterator = iter(
                    self.loader
                )  # here, not in __iter__: nothing starts until a batch is asked for
            while not exhausted and len(window) <= self.depth:
                try:
                    batch = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                self.on_read(batch)
                window.append(batch)
            if not window:
                return
            batch = window.popleft()
            if self.on_yield is not None:
                self.on_yield(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        """The wrapped loader's attributes (``sampler``, ``dataset`` ...)."""
        if name == "loader":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
