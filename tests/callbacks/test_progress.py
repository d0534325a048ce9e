"""The CLI's progress bar shows loss, curriculum stage and training tokens per second."""

from __future__ import annotations

import itertools

from helpers import tiny_module, tiny_trainer
from lightning.pytorch.callbacks import Callback

from distilkit.callbacks import batch_tokens, progress
from distilkit.callbacks.progress import DistilProgressBar


class SeenTokens(Callback):
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens.append(batch_tokens(batch))


def test_a_fit_shows_loss_and_tokens_per_second_over_the_window(tmp_path, datamodule, monkeypatch):
    clock = itertools.count(0.0, 0.5)  # each reading of the bar's clock is half a second later
    monkeypatch.setattr(progress, "perf_counter", lambda: next(clock))
    bar, seen = DistilProgressBar(window=2), SeenTokens()
    trainer = tiny_trainer(tmp_path, max_steps=3, callbacks=[bar, seen], enable_progress_bar=True)
    module = tiny_module(datamodule)
    trainer.fit(module, datamodule=datamodule)

    # readings: start of step 1, end of steps 1-3; a window of 2 steps spans the last two ends (1 s)
    assert bar.tokens_per_second == sum(seen.tokens[-2:]) / 1.0
    shown = bar.get_metrics(trainer, module)
    assert "train/loss" in shown and shown["tok/s"] == f"{sum(seen.tokens[-2:]):,.0f}"

    bar.on_validation_start(trainer, module)  # a validation pause restarts the window
    assert bar.tokens_per_second is None and "tok/s" not in bar.get_metrics(trainer, module)


def test_the_bar_names_the_curriculum_stage_instead_of_a_float(tmp_path, datamodule):
    from distilkit import CurriculumCallback, Stage

    bar = DistilProgressBar()
    curriculum = CurriculumCallback([Stage("warm-up", lr=1e-3, steps=1), Stage("main", lr=1e-3, steps=5)])
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[bar, curriculum], enable_progress_bar=True)
    module = tiny_module(datamodule, teacher=None)
    trainer.fit(module, datamodule=datamodule)
    shown = bar.get_metrics(trainer, module)
    assert shown["stage"] == "main" and "curriculum/stage" not in shown


def test_the_bar_says_epoch_6_not_6_of_minus_2_when_the_run_has_no_epoch_count():
    """Issue 21.7: a run bounded by max_steps has max_epochs -1; Lightning wrote `Epoch 6/-2`."""
    from types import SimpleNamespace

    bar = DistilProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(6).strip() == "Epoch 6"
    bar._trainer = SimpleNamespace(max_epochs=10)
    assert bar._get_train_description(6).strip() == "Epoch 6/9"
