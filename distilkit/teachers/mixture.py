"""A mixture of models as the teacher: the detached mixture of their next-token distributions, formed a chunk
of rows at a time from their final hidden states (the ``(tokens, V)`` logits of the models are never held
whole). What each peer of a cohort learns from (mutual distillation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distilkit.models.heads import OutputHead


@dataclass(frozen=True)
class PeerMixture:
    """``m = Σ_j w_j · softmax(z_j)``, the weighted mean of models' distributions, as a chunk source.

    For the rows of a chunk it returns ``log m = logsumexp_j(log_softmax(z_j) + log w_j)`` ``(n, V)`` in
    float32, with ``z_j = head_j(h_j)`` each model's logits and the weights normalised to sum to 1; any
    :class:`~distilkit.losses.DistillationLoss` reads log-probabilities as logits (a temperature T then
    sharpens or flattens the mixture: ``softmax(log m / T)``). With one model it returns that model's
    logits as they are, exactly what a live teacher (:class:`~distilkit.teachers.live.HeadTargets`) gives.
    Nothing flows back into the models: their features are detached and the heads run under no_grad.

    Attributes:
        features: per model, its final hidden states at the valid positions, ``(N, H_j)``.
        heads: per model, its output head.
        weights: per model, a positive weight (normalised here).
    """

    features: tuple[Tensor, ...]
    heads: tuple[OutputHead, ...]
    weights: tuple[float, ...]

    @classmethod
    def of(
        cls, features: Sequence[Tensor], heads: Sequence[OutputHead], weights: Sequence[float]
    ) -> PeerMixture:
        """A mixture of ``features`` (detached here) through ``heads``, weighted by ``weights``."""
        if not (len(features) == len(heads) == len(weights) >= 1):
            raise ValueError("a mixture needs one head and one weight per model, and at least one model")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        return cls(tuple(f.detach() for f in features), tuple(heads), tuple(float(w) for w in weights))

    def __call__(self, rows: slice, out: Tensor | None = None) -> Tensor:
        """The mixture's ``(n, V)`` log-probabilities at ``rows`` (one model: its logits; in ``out``, a
        float32 buffer, when given)."""
        with torch.no_grad():
            if len(self.features) == 1:
                head = self.heads[0]
                return head.post(head.raw(self.features[0][rows], out=out))  # (n, V)
            total = sum(self.weights)
            mixed: Tensor | None = None
            for features, head, weight in zip(self.features, self.heads, self.weights, strict=True):
                log_probs = head(features[rows]).float().log_softmax(-1) + math.log(weight / total)  # (n, V)
                mixed = log_probs if mixed is None else torch.logaddexp(mixed, log_probs)
            assert mixed is not None
            return mixed
