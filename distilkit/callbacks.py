"""Callbacks for watching a distillation run: token throughput and side-by-side samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor

from distilkit.loggers import wandb_loggers


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Unpadded tokens in a batch (the attention mask's sum, or every position without a mask)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` set up for distilkit batches: ``train/device/items_per_sec`` is
    unpadded tokens per second on each device, ``train/device/samples_per_sec`` blocks per second,
    averaged over the last ``window_size`` steps."""

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=batch_tokens, window_size=window_size)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Training throughput only: Lightning's would log validation rates at validation batch counts, steps
        that run behind the training step (validation time is still left out of the training rate)."""


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
        ids = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)
        ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 10**9) - ids["input_ids"].shape[1]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=max(1, min(self.max_new_tokens, limit)),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        model.train(was_training)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def _write(self, trainer: L.Trainer) -> None:
        columns = ["step", "prompt", "teacher", "student"]
        for logger in wandb_loggers(trainer):
            logger.log_table(key="samples", columns=columns, data=self.rows)
        with Path(trainer.default_root_dir, "samples.jsonl").open("a", encoding="utf-8") as file:
            for row in self.rows[-len(self.prompts) :]:
                file.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n")
