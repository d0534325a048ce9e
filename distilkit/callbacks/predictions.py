"""``distilkit predict``: per-document negative log-likelihood and perplexity, written as jsonl."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from distilkit.files import atomic_write


class PredictionWriter(BasePredictionWriter):
    """Collect the module's per-position NLL (``predict_step``) by document and write one jsonl row each:

    ``{"document": i, "tokens": n, "nll": mean NLL, "ppl": exp(nll), "teacher_nll": ..., "teacher_ppl": ...}``

    ``tokens`` counts the positions predicted within the document (its first token is predicted from the
    block's context before it when there is one, as in training). Documents come from the data module's
    ``predict`` blocks (``PackedBlocks.document_of``; for chat data ``ChatBlocks.document_of``: one row per
    conversation, its tokens the targets); without one each block is its own row.

    Args:
        output_file: the jsonl to write (atomically, when prediction ends).
    """

    def __init__(self, output_file: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output_file = Path(output_file)
        self._sums: dict[str, dict[int, list[float]]] = {}  # model -> document -> [nll sum, count]

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        size, length = batch["input_ids"].shape
        blocks = np.asarray(
            batch_indices if batch_indices is not None else range(batch_idx * size, (batch_idx + 1) * size)
        )
        positions = blocks[:, None] * length + np.arange(1, length)[None, :]  # (B, T-1) the predicted tokens
        documents = self._documents(trainer, positions)
        for model, nll in prediction.items():
            values = nll.detach().float().cpu().numpy()  # (B, T-1), NaN where nothing is predicted
            keep = ~np.isnan(values)
            sums = self._sums.setdefault(model, {})
            for document, value in zip(documents[keep].tolist(), values[keep].tolist(), strict=True):
                entry = sums.setdefault(document, [0.0, 0])
                entry[0] += value
                entry[1] += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sums = _gather(self._sums)
        if not trainer.is_global_zero:
            return
        with atomic_write(self.output_file) as file:
            for row in self.rows(sums):
                file.write(json.dumps(row) + "\n")

    @staticmethod
    def rows(sums: dict[str, dict[int, list[float]]]) -> list[dict[str, Any]]:
        """One row per document, in document order."""
        documents = sorted({d for per_model in sums.values() for d in per_model})
        rows = []
        for document in documents:
            row: dict[str, Any] = {"document": document}
            for model, per_model in sums.items():
                total, count = per_model.get(document, [0.0, 0])
                prefix = "" if model == "student" else f"{model}_"
                row.setdefault("tokens", int(count))
                nll = total / max(count, 1)
                row[f"{prefix}nll"], row[f"{prefix}ppl"] = nll, math.exp(nll)
            rows.append(row)
        return rows

    @staticmethod
    def _documents(trainer: L.Trainer, positions: np.ndarray) -> np.ndarray:
        datamodule: Any = getattr(trainer, "datamodule", None)
        blocks = getattr(datamodule, "datasets", {}).get("predict") if datamodule is not None else None
        if not callable(getattr(blocks, "document_of", None)):  # PackedBlocks and ChatBlocks say
            return positions // (positions.shape[1] + 1)  # each block its own document
        return blocks.document_of(positions)  # type: ignore[union-attr]


def _gather(sums: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, list[float]]]:
    """Add up the per-document sums of every process (documents may span processes' blocks)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sums)
    merged: dict[str, dict[int, list[float]]] = {}
    for part in parts:
        for model, per_model in part.items():
            for document, (total, count) in per_model.items():
                entry = merged.setdefault(model, {}).setdefault(document, [0.0, 0])
                entry[0] += total
                entry[1] += count
    return merged
