"""The targets an offline teacher cache gives back: a few entries of the teacher's distribution per
position (top-k ids with log-probabilities and the tail mass, optionally followed by draws from the tail; or
sampled ids with weights). The losses that use them are in :mod:`distilkit.losses.sparse`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from distilkit.batch import next_token_targets

SparseMode = Literal["topk", "sample"]
MODES: tuple[str, ...] = ("topk", "sample")


@dataclass(frozen=True)
class SparseTargets:
    """The kept entries of the teacher's distribution at each position (leading dims ``...``: ``(B, T)``
    as read from a cache, ``(N,)`` after :meth:`select`).

    Top-k targets hold the K most likely ids (the *head*), the log of the mass outside them (``tail``) and,
    when ``tail_draws`` = S > 0, S more ids drawn from the teacher's distribution restricted to the tail: then
    ``weights`` give each entry the mass it stands for (p_k for a head id, tail / S for a draw), so that
    Σ_i w_i f(x_i) is an unbiased estimate of E_{x∼p}[f(x)] (stratified: the head exact, the tail sampled).

    Attributes:
        mode: ``"topk"`` or ``"sample"``.
        ids: ``(..., E)`` long token ids: E = K (top-k), K + S (top-k with tail draws), S (sample).
        log_probs: ``(..., E)`` float32 teacher log-probabilities of ``ids`` at ``temperature``.
        tail: ``(...)`` float32 log of the teacher's mass outside the head ids (top-k; −inf when K = V), or
            None.
        weights: ``(..., E)`` float32 mass each entry stands for, rows summing to 1 (sample; top-k with tail
            draws), or None.
        temperature: the temperature τ the targets were made at.
        tail_draws: S, how many of the last entries are draws from the tail (top-k only; 0: none).
    """

    mode: SparseMode
    ids: Tensor
    log_probs: Tensor
    tail: Tensor | None = None
    weights: Tensor | None = None
    temperature: float = 1.0
    tail_draws: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.ids.shape != self.log_probs.shape or self.ids.dim() < 1:
            raise ValueError(
                f"ids {tuple(self.ids.shape)} and log_probs {tuple(self.log_probs.shape)} differ"
            )
        weighted = self.mode == "sample" or self.tail_draws > 0
        if (self.mode == "topk") != (self.tail is not None) or weighted != (self.weights is not None):
            raise ValueError(
                "top-k targets carry a tail (and weights only with tail draws); sampled ones weights, no tail"
            )
        if not 0 <= self.tail_draws < self.ids.shape[-1] or (self.mode == "sample" and self.tail_draws):
            raise ValueError(
                f"tail_draws {self.tail_draws} must be below the entries, and 0 for sampled targets"
            )
        if self.tail is not None and self.tail.shape != self.ids.shape[:-1]:
            raise ValueError(f"tail {tuple(self.tail.shape)} does not match ids {tuple(self.ids.shape)}")
        if self.weights is not None and self.weights.shape != self.ids.shape:
            raise ValueError(f"weights {tuple(self.weights.shape)} do not match ids {tuple(self.ids.shape)}")

    @property
    def entries(self) -> int:
        """E: the kept entries per position (K, K + S or S)."""
        return self.ids.shape[-1]

    @property
    def head(self) -> int:
        """K, the leading entries that are the teacher's most likely ids, in order (0 for sampled targets)."""
        return 0 if self.mode == "sample" else self.entries - self.tail_draws

    @property
    def weighted(self) -> bool:
        """Whether the entries carry weights (an unbiased estimate of any E_{x∼p}[f(x)]): sampled targets and
        top-k targets with tail draws."""
        return self.weights is not None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: Any) -> SparseTargets:
        """The targets at ``rows`` of the leading dimension (a slice, an index tensor or a boolean mask)."""
        return self.apply(lambda t: t[rows])

    def to(self, device: torch.device | str) -> SparseTargets:
        return self.apply(lambda t: t.to(device, non_blocking=True))

    def flatten(self) -> SparseTargets:
        """All leading dimensions as one: ``(..., K)`` -> ``(N, K)``."""
        lead = self.ids.dim() - 1
        return self.apply(lambda t: t.reshape(-1, *t.shape[lead:]))

    def select(self, labels: Tensor) -> SparseTargets:
        """From ``(B, T, K)`` block targets to the ``(N, K)`` positions the module trains on.

        Position t of a block holds the teacher's prediction of token t + 1, so the module's shift and mask
        (:func:`distilkit.batch.next_token_targets`) apply: ``targets[:, :-1][keep]``.

        Args:
            labels: ``(B, T)`` the batch's labels.
        """
        if self.ids.dim() != 3 or labels.shape != self.ids.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match targets {tuple(self.ids.shape)}")
        keep, _ = next_token_targets(labels)  # (B, T-1)
        return self.apply(lambda t: t[:, :-1][keep.to(t.device)])  # (N, K) or (N,)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> SparseTargets:
        """New targets with ``fn`` applied to every tensor (ids, log-probs, tail, weights)."""
        return replace(
            self,
            ids=fn(self.ids),
            log_probs=fn(self.log_probs),
            tail=None if self.tail is None else fn(self.tail),
            weights=None if self.weights is None else fn(self.weights),
        )
