"""Where tokenizers meet: the data's tokenizer against the ones saved with the teacher and the student."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from distilkit.data.gguf import is_gguf
from distilkit.data.tokenizer import check_same_vocabulary
from distilkit.models.loading import tokenizer_of


class TokenizerCheck(Callback):
    """Before a run starts, compare the data module's tokenizer with the tokenizer saved beside every model
    directory or GGUF file the module was built from (``model.teacher``, ``model.student``,
    ``model.peers[1]`` ...: its hyperparameters that name a directory with a ``config.json`` or a ``.gguf``
    file), token for token and id for id. A
    mismatch is a :class:`~distilkit.errors.ConfigError` naming both and the first differing tokens; a model
    directory without a tokenizer is said once (its vocabulary is then checked by size only)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = getattr(trainer, "datamodule", None)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is None:
            return
        for field, directory in model_directories(dict(pl_module.hparams)):
            own = tokenizer_of(directory, field)
            if own is None:
                rank_zero_warn(
                    f"{field}={directory!r} has no tokenizer files: its vocabulary is checked by size only"
                )
                continue
            source = getattr(tokenizer, "name_or_path", "") or "the data"
            check_same_vocabulary(own, f"{field} ({directory})", tokenizer, f"data.tokenizer ({source})")


def model_directories(hparams: dict[str, Any], prefix: str = "model") -> Iterator[tuple[str, str]]:
    """``(field, directory)`` of every hyperparameter that names a model directory (one with a config.json)
    or a GGUF file, in lists too (``model.peers[1]``)."""
    for name, value in hparams.items():
        values = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in values:
            if isinstance(item, str) and (
                is_gguf(item) or (Path(item).expanduser() / "config.json").is_file()
            ):
                yield (f"{prefix}.{name}" if index is None else f"{prefix}.{name}[{index}]"), item
