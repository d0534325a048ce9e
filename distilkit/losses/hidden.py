"""Intermediate-layer distillation: match chosen student hidden states to teacher hidden states."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilkit.errors import ConfigError


class HiddenStateLoss(nn.Module):
    """MSE or cosine distance between mapped student and teacher hidden states.

    For each pair (i → j) of ``layer_map``, student hidden state ``h_s[i]`` ``(N, H_s)`` is compared with
    teacher hidden state ``h_t[j]`` ``(N, H_t)`` at the same (unpadded) positions:

        mse:    mean over positions and features of (P·h_s − h_t)²
        cosine: mean over positions of 1 − cos(P·h_s, h_t)   (DistilBERT / DistilGPT-2, Sanh et al. 2019)

    and the result is the mean over pairs. Index 0 is the embedding output and index k the output of
    block k (the Hugging Face ``hidden_states`` convention). When the widths differ, P is a learned
    linear projection per pair (FitNets, Romero et al. 2015); otherwise the identity. The projections
    are trained with the student but belong to the distillation module: they are never exported.

    Args:
        layer_map: ``{student_layer: teacher_layer}``, e.g. ``{1: 2, 2: 4}``.
        metric: ``"mse"`` or ``"cosine"`` (default).
        weight: weight of this term in the module's total loss (default 1.0).
    """

    def __init__(
        self, layer_map: Mapping[int, int], metric: Literal["mse", "cosine"] = "cosine", weight: float = 1.0
    ) -> None:
        super().__init__()
        if not layer_map:
            raise ConfigError(
                "hidden_loss.layer_map", dict(layer_map), "is empty", "map at least one layer, e.g. {2: 4}"
            )
        if metric not in ("mse", "cosine"):
            raise ConfigError("hidden_loss.metric", metric, "is not a metric", 'use "mse" or "cosine"')
        if weight < 0:
            raise ConfigError("hidden_loss.weight", weight, "must be >= 0", "use e.g. 1.0")
        self.layer_map = {int(s): int(t) for s, t in layer_map.items()}
        self.metric, self.weight = metric, float(weight)
        self.projections = nn.ModuleDict()

    def bind_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Check the map against the two models' configs and create the projections (called by the module)."""
        if teacher is None:
            raise ConfigError(
                "model.hidden_loss",
                type(self).__name__,
                "needs a teacher",
                "set model.teacher or drop hidden_loss",
            )
        (student_width, student_depth), (teacher_width, teacher_depth) = map(
            _width_and_depth, (student, teacher)
        )
        self.bind(student_width, teacher_width, student_depth, teacher_depth)

    def bind(self, student_width: int, teacher_width: int, student_layers: int, teacher_layers: int) -> None:
        """Check the map against the models and create the projections (called by the module)."""
        for s, t in self.layer_map.items():
            for side, layer, depth in (("student", s, student_layers), ("teacher", t, teacher_layers)):
                if not 0 <= layer <= depth:
                    raise ConfigError(
                        "hidden_loss.layer_map",
                        self.layer_map,
                        f"{side} layer {layer} does not exist",
                        f"use 0..{depth}",
                    )
        if student_width != teacher_width and not self.projections:
            for s in self.layer_map:
                self.projections[str(s)] = nn.Linear(student_width, teacher_width, bias=False)

    def forward(
        self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mask: Tensor | None = None
    ) -> Tensor:
        """Mean distance over the mapped pairs.

        Args:
            student_hidden: per layer ``(B, T, H_s)`` (index 0: embeddings).
            teacher_hidden: per layer ``(B, T, H_t)``.
            mask: ``(B, T)`` true at positions to compare (default: all).
        """
        total = student_hidden[0].new_zeros((), dtype=torch.float32)
        for s, t in self.layer_map.items():
            student, teacher = student_hidden[s], teacher_hidden[t].detach()
            if mask is not None:
                student, teacher = student[mask], teacher[mask]  # (N, H)
            if str(s) in self.projections:
                student = self.projections[str(s)](student)  # (N, H_t)
            student, teacher = student.float(), teacher.float()
            if self.metric == "mse":
                distance = F.mse_loss(student, teacher, reduction="sum") / max(student.numel(), 1)
            else:
                cosine = F.cosine_similarity(student, teacher, dim=-1)  # (N,)
                distance = (1 - cosine).sum() / max(cosine.numel(), 1)
            total = total + distance
        return total / len(self.layer_map)


def _width_and_depth(model: nn.Module) -> tuple[int, int]:
    """(hidden size, number of blocks) from a Hugging Face config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            "model.hidden_loss",
            type(model).__name__,
            "has no config to read widths from",
            "use Hugging Face causal LMs with hidden_loss",
        )
    return int(config.hidden_size), int(config.num_hidden_layers)
