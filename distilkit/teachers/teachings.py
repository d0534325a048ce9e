"""What several teachers hand the loss for one batch: routed teachings (each position taught by its own
teacher, the teachers' rows merged back in position order) and mixed teachings (every position from the
weighted mixture of the teachers' distributions). :class:`~distilkit.teachers.several.SeveralTeachers` makes
them; the chunked loss reads them a slice of rows at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distilkit.data.teacher_cache import SparseTargets
from distilkit.errors import ConfigError
from distilkit.losses.aligned import AlignedLogits
from distilkit.losses.chunked import TeacherChunks
from distilkit.losses.partial import PartialTargets

FIELD = "model.teachers"
#: the route of a position that predicts nothing / that no teacher teaches (it learns from its label alone)
NOT_PREDICTED, LABELS_ONLY = -2, -1


@dataclass(frozen=True)
class RoutedTeaching:
    """A batch taught by routes: each position's teacher and what each teacher said about its rows.

    Attributes:
        route: ``(B, T-1)`` long on the CPU: the index of the teacher of each position, -1 where it learns
            from its label alone, -2 where it predicts nothing.
        taught: per teacher index, ``(rows (B,) bool, its teaching of those rows)``.
        labels_only: whether untaught positions are allowed (``unrouted: labels``).
        device: the batch's device.
    """

    route: Tensor
    taught: dict[int, tuple[Tensor, Any]]
    labels_only: bool
    device: torch.device
    hidden_states: None = None

    @property
    def logged(self) -> dict[str, Tensor]:
        """``labels_only_share``: the share of predicted positions that learn from their labels alone."""
        if not self.labels_only:
            return {}
        predicted = int((self.route != NOT_PREDICTED).sum())
        alone = int((self.route == LABELS_ONLY).sum())
        return {"labels_only_share": torch.tensor(alone / max(predicted, 1), device=self.device)}

    def at(self, keep: Tensor) -> RoutedChunks:
        """Each teacher's chunks at its positions among ``keep`` ``(B, T-1)``, merged in row order."""
        kept_route = self.route[keep.cpu()].numpy()  # (N,)
        parts = []
        for index, (rows, teaching) in self.taught.items():
            own = keep[rows.to(keep.device)] & (self.route[rows] == index).to(keep.device)  # (b, T-1)
            parts.append((np.flatnonzero(kept_route == index), teaching.at(own)))
        return RoutedChunks(tuple(parts), np.flatnonzero(kept_route == LABELS_ONLY), self.device)


@dataclass(frozen=True)
class RoutedChunks:
    """The routed teachers' targets for any rows of the N kept positions.

    Attributes:
        parts: per teacher, ``(positions, chunks)``: the sorted kept positions it teaches ``(N_j,)`` and its
            chunk source over exactly those positions, in order.
        alone: the sorted kept positions that learn from their labels alone.
        device: where the targets are.
    """

    parts: tuple[tuple[np.ndarray, TeacherChunks], ...]
    alone: np.ndarray
    device: torch.device

    def __call__(self, rows: slice, out: Tensor | None = None) -> Tensor | SparseTargets | PartialTargets:
        """The targets of ``rows``: one teacher's own chunk when it teaches them all (the usual case: blocks
        are mostly one document), else the teachers' rows merged, wrapped as :class:`PartialTargets` when
        some rows learn from their labels alone."""
        start, stop = rows.start, rows.stop
        pieces = []
        for positions, chunks in self.parts:
            low, high = np.searchsorted(positions, [start, stop])
            if high > low:
                pieces.append((positions[low:high] - start, chunks, slice(int(low), int(high))))
        low, high = np.searchsorted(self.alone, [start, stop])
        alone = self.alone[low:high] - start
        if not len(alone) and len(pieces) == 1:
            whole = pieces[0][1](pieces[0][2], out=out)
            assert not isinstance(whole, AlignedLogits)  # its teachers read the data's tokens (TeacherLoader)
            return whole
        if not pieces:  # every row learns from its label (or there are none)
            return PartialTargets(torch.zeros(stop - start, dtype=torch.bool, device=self.device), None, 0)
        taught = np.sort(np.concatenate([local for local, _, _ in pieces]))
        merged = merge_rows(
            [(np.searchsorted(taught, local), chunks(part)) for local, chunks, part in pieces], out
        )
        if not len(alone):
            return merged
        mask = torch.ones(stop - start, dtype=torch.bool)
        mask[torch.from_numpy(alone)] = False
        return PartialTargets(mask.to(self.device), merged, len(taught))


@dataclass(frozen=True)
class MixedTeaching:
    """The active teachers' teachings of one batch, with their weights.

    Attributes:
        teachings: per active teacher, its teaching of the whole batch.
        weights: per active teacher, its weight (> 0; normalised when used).
        labels: ``(B, T-1)`` the token each position predicts, when the weights are a prior to update by
            each teacher's probability of it (``mix_by: posterior``); None: fixed weights.
    """

    teachings: tuple[Any, ...]
    weights: tuple[float, ...]
    labels: Tensor | None = None
    hidden_states: None = None

    def at(self, keep: Tensor) -> MixedChunks:
        labels = None if self.labels is None else self.labels[keep]  # (N,)
        return MixedChunks(tuple(teaching.at(keep) for teaching in self.teachings), self.weights, labels)


@dataclass(frozen=True)
class MixedChunks:
    """The teachers' mixture ``(n, V)`` float32 log-probabilities for any rows, from each teacher's logits
    ``z_j``; one teacher: its logits as they are.

    Fixed weights (``labels`` None): ``log m = logsumexp_j(log_softmax(z_j) + log(w_j / Σ w))``.
    Posterior weights: with ``y`` the row's label, ``a_j = log w_j + log_softmax(z_j)[y]`` and
    ``log m = logsumexp_j(log_softmax(z_j) + a_j) - logsumexp_j(a_j)``, i.e. ``m = Σ_j π_j · softmax(z_j)``
    with ``π_j = w_j p_j(y) / Σ_k w_k p_k(y)`` (where every teacher gives ``y`` probability 0, the prior
    weights: never NaN); it holds the J teachers' ``(n, V)`` log-probabilities at once.

    Attributes:
        sources: per teacher, its chunk source over the N kept positions.
        weights: per teacher, its weight (> 0).
        labels: ``(N,)`` the kept positions' labels (posterior weights), or None.
    """

    sources: tuple[TeacherChunks, ...]
    weights: tuple[float, ...]
    labels: Tensor | None = None

    def __call__(self, rows: slice, out: Tensor | None = None) -> Tensor:
        if len(self.sources) == 1:
            return self.sources[0](rows, out=out)  # type: ignore[return-value]
        total = sum(self.weights)
        log_prior = [math.log(weight / total) for weight in self.weights]
        if self.labels is None:
            mixed: Tensor | None = None
            for source, log_weight in zip(self.sources, log_prior, strict=True):
                log_probs = _log_probs(source, rows) + log_weight  # (n, V)
                mixed = log_probs if mixed is None else torch.logaddexp(mixed, log_probs)
            assert mixed is not None
            return mixed
        every = [_log_probs(source, rows) for source in self.sources]  # J x (n, V)
        label = self.labels[rows].to(every[0].device)[:, None]  # (n, 1)
        joint = [lp.gather(-1, label) + w for lp, w in zip(every, log_prior, strict=True)]  # J x (n, 1)
        ruled_out = torch.stack(joint).isneginf().all(0)  # (n, 1): no teacher allows the label
        joint = [
            torch.where(ruled_out, torch.full_like(a, w), a) for a, w in zip(joint, log_prior, strict=True)
        ]
        posterior = torch.cat(joint, -1).log_softmax(-1)  # (n, J) log π
        mixed = every[0] + posterior[:, :1]
        for j in range(1, len(every)):
            mixed = torch.logaddexp(mixed, every[j] + posterior[:, j : j + 1])
        return mixed


def _log_probs(source: TeacherChunks, rows: slice) -> Tensor:
    """A teacher's ``(n, V)`` float32 log-probabilities at ``rows``."""
    logits = source(rows)
    assert isinstance(logits, Tensor), "mixed teachers hand out logits"
    return logits.float().log_softmax(-1)


def merge_rows(values: list[tuple[np.ndarray, Any]], out: Tensor | None) -> Tensor | SparseTargets:
    """One chunk from pieces: each ``(slots, rows)`` puts its rows at those slots (``0..n_t``); dense rows in
    float32, in ``out`` when it is a buffer of at least that many rows."""
    count = sum(len(slots) for slots, _ in values)
    first = values[0][1]
    if isinstance(first, SparseTargets):
        order = torch.from_numpy(np.argsort(np.concatenate([slots for slots, _ in values]), kind="stable"))
        parts = [targets for _, targets in values]
        if len({targets.entries for targets in parts}) > 1:
            raise ConfigError(
                FIELD, sorted({t.entries for t in parts}), "caches keep different numbers of entries",
                "make the routed caches with one --top_k / --samples",
            )  # fmt: skip
        return cat_sparse(parts)[order.to(first.ids.device)]
    shape = (count, first.shape[-1])
    usable = (
        out is not None and out.dtype == torch.float32 and out.shape[0] >= count and out.shape[1] == shape[1]
    )
    merged = out[:count] if usable else torch.empty(shape, dtype=torch.float32, device=first.device)  # type: ignore[index]
    for slots, logits in values:
        merged[torch.from_numpy(slots).to(logits.device)] = logits.float()
    return merged


def cat_sparse(parts: list[SparseTargets]) -> SparseTargets:
    """Sparse targets one after another along the rows."""
    first = parts[0]
    tail = None if first.tail is None else torch.cat([p.tail for p in parts if p.tail is not None])
    weights = (
        None if first.weights is None else torch.cat([p.weights for p in parts if p.weights is not None])
    )
    ids, log_probs = torch.cat([p.ids for p in parts]), torch.cat([p.log_probs for p in parts])
    return replace(first, ids=ids, log_probs=log_probs, tail=tail, weights=weights)
