"""The served teacher's look-ahead, installed on the run's data module for the length of a trainer stage.

Lightning asks the data module for its loaders (``train_dataloader()`` ...) when a loop starts and reads
them one batch at a time, with no batch fetched ahead when their length is known. :class:`LookAhead`
(a callback the distillation module adds for a served teacher) makes the loaders the data module gives
during a stage :class:`~distilkit.data.read_ahead.ReadAhead` loaders of the source: each batch's blocks are
sent to the server as soon as the batch is read, ``look_ahead`` batches before it trains. It does so by
shadowing the loader methods on that data module object for the stage (the class is left alone) and
removes the shadows when the stage ends or fails. Without a data module it warns once and the source scores
each batch in its step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from distilkit.teachers.base import Split

#: Per trainer stage, the data module's loader methods read ahead, with the split their batches teach.
LOADERS: dict[str, tuple[tuple[str, Split], ...]] = {
    "fit": (("train_dataloader", "train"), ("val_dataloader", "val")),
    "validate": (("val_dataloader", "val"),),
    "test": (("test_dataloader", "val"),),
    "predict": (("predict_dataloader", "val"),),
}
#: The attribute that marks a shadowing loader method (and holds the method it shadows).
MARK = "_distilkit_read_ahead_of"


class LookAhead(Callback):
    """Reads the data module's loaders ahead for a served teacher (see the module docstring).

    Args:
        source: the served teacher source (its ``read_ahead(loader, split)``, ``close()``).
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self._shadowed: list[tuple[Any, str]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data: Any = getattr(trainer, "datamodule", None)
        if data is None:
            rank_zero_warn(
                "a served teacher reads batches ahead only from a LightningDataModule; with loaders passed "
                "to the trainer each batch is scored when its step starts"
            )
            return
        for name, split in LOADERS.get(stage, ()):
            original = getattr(data, name, None)
            if original is None or hasattr(original, MARK):
                continue
            setattr(data, name, self._reading_ahead(original, split))
            self._shadowed.append((data, name))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        self.source.drop_pending()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """A failed stage does not reach ``teardown``: stop the client (its retries end) and restore."""
        self._restore()
        self.source.close()

    def _reading_ahead(self, original: Callable[[], Any], split: Split) -> Callable[[], Any]:
        @functools.wraps(original)
        def loader() -> Any:
            return self.source.read_ahead(original(), split)

        setattr(loader, MARK, original)
        return loader

    def _restore(self) -> None:
        for data, name in self._shadowed:
            vars(data).pop(name, None)  # the class's method shows again
        self._shadowed.clear()
