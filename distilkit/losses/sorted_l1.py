"""The L1 distance between two sorted probability vectors: the core of ULD and GOLD
(:mod:`distilkit.losses.cross_tokenizer`).

Σ_i |sort↓(p)_i − sort↓(q)_i| over rows of different lengths (the shorter padded with zeros) is the
Wasserstein-1 distance between two distributions when any two different tokens are at distance 1 (Boizard
et al. 2024). Sorting dominates its cost: on the CPU numpy's vectorised sorts are used (2-5x faster than
``torch.sort`` on this machine's 2 cores), their rows split over torch's intra-op threads (numpy lets go of
the GIL while it sorts); elsewhere ``torch.sort``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

#: Device types whose rows are sorted by numpy (vectorised, in place of ``torch.sort``).
NUMPY_SORT_DEVICES: tuple[str, ...] = ("cpu",)
#: The fewest rows a thread sorts (fewer: not worth handing out).
ROWS_PER_THREAD = 64


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Σ_i |sort↓(p)_i − sort↓(q)_i|, the shorter row padded with zeros; rows ``(M, V_p)``, ``(M, V_q)`` ->
    ``(M,)``. The plain formula (autograd through ``torch.sort``); :func:`sorted_l1_fast` computes the
    same."""
    p = p.sort(-1, descending=True).values  # (M, V_p)
    q = q.sort(-1, descending=True).values  # (M, V_q)
    common = min(p.shape[-1], q.shape[-1])
    head = (p[:, :common] - q[:, :common]).abs().sum(-1)  # (M,)
    return head + p[:, common:].sum(-1) + q[:, common:].sum(-1)  # past the shorter row: the longer's tail


def sorted_l1_fast(p: Tensor, q: Tensor) -> Tensor:
    """:func:`sorted_l1` with the gradient with respect to ``q`` formed in the forward pass (``p`` gets none),
    kept as int8 signs (see :func:`sorted_l1_and_signs`). Under ``torch.compile``: the plain formula."""
    if torch.compiler.is_compiling():
        return sorted_l1(p.detach(), q)
    return _SortedL1Rows.apply(q, p.detach())


def sorted_l1_and_signs(p: Tensor, q: Tensor, signs: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`sorted_l1` of detached rows, and (``signs``) its gradient with respect to ``q``:
    ∂/∂q_j = sign(q_j − p_(r)) where r is q_j's rank in q (sign(q_j) past the shorter row), ``(M, V_q)`` int8
    in q's order. One sort of each row (with the order only for ``q``), one pass for the differences, one
    scatter."""
    q_sorted, order = _sorted_with_order(q) if signs else (_sorted(q), None)  # (M, V_q), increasing
    p_sorted = _sorted(p)  # (M, V_p), increasing
    common = min(q.shape[-1], p.shape[-1])
    tail_q, tail_p = q.shape[-1] - common, p.shape[-1] - common  # entries that meet the zero padding
    diff = q_sorted[:, tail_q:] - p_sorted[:, tail_p:]  # (M, common): the largest entries pair up
    rows = diff.abs().sum(-1) + q_sorted[:, :tail_q].sum(-1) + p_sorted[:, :tail_p].sum(-1)  # (M,)
    if order is None:
        return rows, None
    sorted_signs = torch.cat([q_sorted[:, :tail_q].sign(), diff.sign()], dim=-1).to(torch.int8)  # (M, V_q)
    return rows, torch.empty_like(sorted_signs).scatter_(-1, order, sorted_signs)  # back to q's order


class _SortedL1Rows(torch.autograd.Function):
    """``(q (M, V_q), p (M, V_p)) -> (M,)``: :func:`sorted_l1`, the gradient for q only (see
    :func:`sorted_l1_fast`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: Tensor, p: Tensor) -> Tensor:  # type: ignore[override]
        rows, signs = sorted_l1_and_signs(p, q, signs=ctx.needs_input_grad[0])  # type: ignore[attr-defined]
        if signs is not None:
            ctx.save_for_backward(signs)
        return rows

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_rows: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (signs,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return signs.to(grad_rows.dtype) * grad_rows.unsqueeze(-1), None


def _sorted(rows: Tensor) -> Tensor:
    """Each row of ``(M, V)`` sorted increasingly (numpy's vectorised sort on the CPU)."""
    if rows.device.type not in NUMPY_SORT_DEVICES:
        return torch.sort(rows, dim=-1).values
    values = rows.detach().numpy().copy()
    _by_rows(lambda part: values[part].sort(axis=-1), len(values))
    return torch.from_numpy(values)


def _sorted_with_order(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``(M, V)`` sorted increasingly, and the ``(M, V)`` int64 order that sorts it."""
    if rows.device.type not in NUMPY_SORT_DEVICES:
        sorted_rows = torch.sort(rows, dim=-1)
        return sorted_rows.values, sorted_rows.indices
    array = rows.detach().numpy()
    values, order = np.empty_like(array), np.empty(array.shape, dtype=np.int64)

    def sort(part: slice) -> None:
        order[part] = np.argsort(array[part], axis=-1)
        values[part] = np.take_along_axis(array[part], order[part], axis=-1)

    _by_rows(sort, len(array))
    return torch.from_numpy(values), torch.from_numpy(order)


def _by_rows(work: Callable[[slice], None], count: int) -> None:
    """``work`` on slices of ``count`` rows in parallel, one per torch intra-op thread (at least
    :data:`ROWS_PER_THREAD` rows each)."""
    parts = max(1, min(torch.get_num_threads(), count // ROWS_PER_THREAD))
    bounds = [count * i // parts for i in range(parts + 1)]
    pieces = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    if parts == 1:
        work(pieces[0])
        return
    pool = _pool(parts)
    for done in [pool.submit(work, piece) for piece in pieces]:
        done.result()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="distilkit-sort")


# a forked child has none of the pools' threads: it makes its own (a DataLoader worker, a forked DDP rank)
os.register_at_fork(after_in_child=_pool.cache_clear)
