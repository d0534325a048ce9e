"""A table of teacher and student continuations at each validation, to read how a run is going."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from distilkit.models.generation import generate_text
from distilkit.run.loggers import wandb_loggers


class SampleTable(Callback):
    """Every ``every_n_validations`` validations, continue each prompt with the teacher and the student
    (greedy) and log the rows ``(step, prompt, teacher, student)``: as a ``wandb.Table`` named ``samples``
    when a W&B logger is present, and always appended to ``samples.jsonl`` in the run directory.

    Args:
        prompts: the texts to continue.
        every_n_validations: how often (default every validation).
        max_new_tokens: length of each continuation.
    """

    def __init__(self, prompts: list[str], every_n_validations: int = 1, max_new_tokens: int = 32) -> None:
        if not prompts:
            raise ValueError("SampleTable.prompts is empty: give at least one prompt")
        if every_n_validations < 1 or max_new_tokens < 1:
            raise ValueError("SampleTable.every_n_validations and max_new_tokens must be >= 1")
        self.prompts, self.every, self.max_new_tokens = prompts, every_n_validations, max_new_tokens
        self.validations = 0
        self.rows: list[list[Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.validations += 1
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None or self.validations % self.every:
            return
        for prompt in self.prompts:
            row = [
                trainer.global_step,
                prompt,
                self._continue(getattr(pl_module, "teacher", None), tokenizer, prompt),
                self._continue(getattr(pl_module, "student", None), tokenizer, prompt),
            ]
            self.rows.append(row)
        self._write(trainer)

    def _continue(self, model: Any, tokenizer: Any, prompt: str) -> str:
        if model is None or not hasattr(model, "generate"):
            return ""
        return generate_text(model, tokenizer, [prompt], max_new_tokens=self.max_new_tokens, greedy=True)[0]

    def _write(self, trainer: L.Trainer) -> None:
        columns = ["step", "prompt", "teacher", "student"]
        for logger in wandb_loggers(trainer):
            logger.log_table(key="samples", columns=columns, data=self.rows)
        with Path(trainer.default_root_dir, "samples.jsonl").open("a", encoding="utf-8") as file:
            for row in self.rows[-len(self.prompts) :]:
                file.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n")
