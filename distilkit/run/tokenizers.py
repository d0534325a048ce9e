"""Where tokenizers meet: the data's tokenizer against the ones saved with the models a module trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from distilkit.data.gguf import is_gguf
from distilkit.models.loading import check_model_tokenizer


class TokenizerCheck(Callback):
    """Before a run starts, compare the data module's tokenizer with the tokenizer saved beside every model
    directory or GGUF file the module trains (``model.student``, ``model.peers[1]`` ...: its hyperparameters
    that name a directory with a ``config.json`` or a ``.gguf`` file; the teacher's is left out, as a teacher
    source checks its own), token for token and id for id
    (:func:`~distilkit.models.loading.check_model_tokenizer`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            return
        for field, directory in model_directories(dict(pl_module.hparams)):
            if field != "model.teacher":
                check_model_tokenizer(field, directory, tokenizer)


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
