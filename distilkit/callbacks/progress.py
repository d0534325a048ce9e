"""The CLI's progress bar: Lightning's rich bar plus training tokens per second."""

from __future__ import annotations

from collections import deque
from time import perf_counter
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from distilkit.callbacks.curriculum import CurriculumCallback
from distilkit.callbacks.throughput import batch_tokens


class DistilProgressBar(RichProgressBar):
    """``RichProgressBar`` that also shows ``tok/s``: unpadded training tokens per second on this process,
    over the last ``window`` steps (validation pauses are left out: the window restarts after each).
    The loss appears because the module logs it to the bar; the curriculum's stage is shown by its name.

    Args:
        window: steps averaged.
        **kwargs: ``RichProgressBar``'s own (``refresh_rate``, ``leave``, ``theme``, ...).
    """

    def __init__(self, window: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ends: deque[float] = deque(maxlen=window + 1)  # perf_counter at each step's end
        self._tokens: deque[int] = deque(maxlen=window)  # tokens of the steps between those ends

    @property
    def tokens_per_second(self) -> float | None:
        """The rate over the window; None until two steps have ended since the last pause."""
        if len(self._ends) < 2:
            return None
        return sum(self._tokens) / max(self._ends[-1] - self._ends[0], 1e-9)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        if not self._ends:
            self._ends.append(perf_counter())  # the first step of a window starts its clock
        super().on_train_batch_start(trainer, pl_module, batch, *args)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._ends.append(perf_counter())
        self._tokens.append(batch_tokens(batch))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ends.clear()
        self._tokens.clear()
        super().on_validation_start(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        """``Epoch 6/9`` when the run has a number of epochs, ``Epoch 6`` when it has none (Lightning writes
        ``Epoch 6/-2`` for ``max_epochs: -1``). Private in Lightning: see
        :data:`distilkit.run.lightning_internals.RICH_TRAIN_DESCRIPTION`."""
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        curriculum = next((c for c in trainer.callbacks if isinstance(c, CurriculumCallback)), None)  # type: ignore[attr-defined]
        if curriculum is not None:  # the stage by name, not as the float 2.000 it is logged as
            metrics.pop("curriculum/stage", None)
            metrics["stage"] = curriculum.stage.name or str(curriculum.state.stage)
        rate = self.tokens_per_second
        if rate is not None:
            metrics["tok/s"] = f"{rate:,.0f}"
        return metrics


class PositionsProgressBar(RichProgressBar):
    """``RichProgressBar`` for a predict loop that shows the positions (tokens, padding included) it has gone
    through per second on this process, since the loop's first batch (``distilkit cache`` uses it).

    Args:
        description: the word before the rate.
        **kwargs: ``RichProgressBar``'s own.
    """

    def __init__(self, description: str = "predicting", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.description = description
        self._start: float | None = None
        self.positions = 0

    @property
    def positions_per_second(self) -> float | None:
        if self._start is None or not self.positions:
            return None
        return self.positions / max(perf_counter() - self._start, 1e-9)

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        if self._start is None:
            self._start = perf_counter()
        super().on_predict_batch_start(trainer, pl_module, batch, *args)

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.positions += int(batch["input_ids"].numel())
        rate = self.positions_per_second
        if self.progress is not None and self.predict_progress_bar_id is not None and rate is not None:
            text = f"{self.description} {rate:,.0f} pos/s"
            self.progress.update(self.predict_progress_bar_id, description=text)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, *args)
