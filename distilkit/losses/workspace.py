"""Scratch buffers reused from chunk to chunk and from step to step.

The chunked loss forms, for every chunk of rows, a few float32 ``(rows, V)`` tensors (the student's logits,
the teacher's, log-softmaxes, the gradient). On a CPU a fresh tensor of tens of MiB is new memory from the
operating system each time, paid in page faults when it is first written; buffers kept and reused pay that
once. (A GPU's caching allocator reuses memory by itself; the buffers cost nothing more there.)

A :class:`Workspace` keeps named buffers, grown to the largest size asked for. The chunk loop *lends* its
workspace while it works on a chunk (:meth:`Workspace.lent`): code running inside, such as the fused
cross-entropy and forward-KL function, takes its buffers from :func:`scratch_space`, which falls back to fresh
tensors when no workspace is lent. Each computation inside one lending gets buffers of its own (two calls in
one chunk never share one); the next lending reuses them, so the loop finishes each chunk (forward and
gradient) before it starts the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

#: ``(name, like) -> a float32 tensor of like's 2-D shape (rows, V)``, to overwrite.
Scratch = Callable[[str, Tensor], Tensor]


class Workspace:
    """Named float32 buffers, made on first use, grown when a larger one is asked for, reused otherwise."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._calls = 0

    def __call__(self, name: str, rows: int, width: int, device: torch.device) -> Tensor:
        """A ``(rows, width)`` float32 view of buffer ``name`` on ``device`` (holding whatever was there)."""
        size = rows * width
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(size, device=device)
        return buffer[:size].view(rows, width)

    def clear(self) -> None:
        """Free every buffer."""
        self._buffers.clear()

    @contextmanager
    def lent(self) -> Iterator[Workspace]:
        """Make this the workspace :func:`scratch_space` takes buffers from, inside the block."""
        self._calls = 0
        token = _LENT.set(self)
        try:
            yield self
        finally:
            _LENT.reset(token)

    def next_call(self) -> int:
        """A number for the next computation that takes buffers in this lending."""
        self._calls += 1
        return self._calls


_LENT: ContextVar[Workspace | None] = ContextVar("distilkit_workspace", default=None)


def scratch_space() -> Scratch:
    """Buffers for one computation: from the lent workspace (names of their own for this computation), or
    new tensors when none is lent."""
    workspace = _LENT.get()
    if workspace is None:
        return lambda name, like: torch.empty(like.shape[0], like.shape[1], device=like.device)
    call = workspace.next_call()
    return lambda name, like: workspace(f"{call}.{name}", like.shape[0], like.shape[1], like.device)


def in_chunk_loop() -> bool:
    """Whether a workspace is lent: the chunked loss is working on a chunk (where fused closed-form functions
    take the place of autograd through the definitions; the reference path, ``chunk_size: null``, keeps
    autograd, so tests compare the two)."""
    return _LENT.get() is not None
