"""``distilkit evaluate``: perplexity and bits per byte of models on data, and their agreement and KL with a
teacher.

Each model is scored by :class:`DistillationModule`'s own validation loop (the metrics of training,
``val/ppl``, ``val/bpb``, ``val/top1_agreement``, ``val/kl``) on the held-out split that training used (same
files, ``val_fraction`` and seed), or on all blocks with ``--split all``, each with its own tokenizer: bits
per byte compare models whose tokenizers differ, side by side. With the ``eval`` extra,
``--lm_eval_tasks`` also runs EleutherAI's lm-evaluation-harness on every model
(:mod:`distilkit.commands.harness`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import PreTrainedTokenizerBase

from distilkit.commands.harness import Harness
from distilkit.data import TextDataModule
from distilkit.data.token_bytes import token_byte_lengths
from distilkit.data.tokenizer import same_vocabulary, tokenizer_hash
from distilkit.errors import ConfigError
from distilkit.files import check_writable, write_text
from distilkit.metrics import EvaluationMetrics
from distilkit.models.checkpoint import load_model_and_tokenizer, trained_block_size
from distilkit.modules import DistillationModule


def evaluate(
    models: list[str],
    data_files: str | list[str] = "builtin:python-reference",
    teacher: str | None = None,
    block_size: int | None = None,
    batch_size: int = 16,
    val_fraction: float = 0.1,
    seed: int = 0,
    split: Literal["val", "all"] = "val",
    output_json: str | None = None,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_limit: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score each model; returns one row per model (and one for the teacher), also written as JSON.

    Every model reads the text with its own tokenizer (a model without one with the teacher's, else the first
    model's): the same documents (the held-out split is drawn by document) packed into blocks of its own
    tokens. ``ppl`` is per token of the model's tokenizer; ``bpb`` (bits per byte of the predicted text)
    compares models with different tokenizers. Agreement and KL with the teacher are computed for the
    models that share its tokenizer.

    Args:
        models: distilkit checkpoints (``.ckpt``) or Hugging Face model directories.
        data_files: text to score on, as for ``TextDataModule.train_files``.
        teacher: a model to compare against (agreement, KL, for models with its tokenizer).
        block_size: tokens per scored block; default: the block size the checkpoints were trained with
            (the shortest), else 128. Longer than a model's context is refused.
        batch_size / val_fraction / seed: as in training, so the held-out split is the same.
        split: ``val`` (the held-out documents) or ``all``.
        output_json: where to write the rows (optional).
        lm_eval_tasks: harness tasks to run on every model (names or task YAML files); each row then has
            ``lm_eval: {task: {metric: value}}``.
        lm_eval_limit: documents per harness task (None: all).
        progress: show progress bars.
    """
    if not models:
        raise ConfigError("models", models, "is empty", "give at least one checkpoint or model directory")
    if output_json:
        check_writable(output_json, "output_json")
    harness = Harness(lm_eval_tasks, limit=lm_eval_limit, batch_size=batch_size) if lm_eval_tasks else None
    teacher_model, teacher_tokenizer = (
        load_model_and_tokenizer(teacher, "teacher") if teacher else (None, None)
    )
    loaded = [(name, *load_model_and_tokenizer(name, "models")) for name in models]
    fallback = teacher_tokenizer or next((t for _, _, t in loaded if t is not None), None)
    if fallback is None:
        raise ConfigError("models", models, "carry no tokenizer", "export them with distilkit export first")
    if block_size is None:
        trained = [size for size in map(trained_block_size, models) if size is not None]
        block_size = min(trained) if trained else 128
    texts = Blocks(data_files, block_size, batch_size, val_fraction, seed, split, progress)
    rows = []
    teacher_row: dict[str, Any] | None = None
    for name, model, own in loaded:
        tokenizer = own or fallback
        shared = teacher_tokenizer is not None and same_vocabulary(teacher_tokenizer, tokenizer)
        beside = (
            teacher_model if shared or (teacher_model is not None and teacher_tokenizer is None) else None
        )
        metrics, tokens = texts.score(model, tokenizer, beside)
        rows.append({"model": name, **_scores(metrics, "val/", tokenizer, tokens)})
        if beside is not None:
            rows[-1].update(top1_agreement=metrics["val/top1_agreement"], kl=metrics["val/kl"])
            teacher_row = teacher_row or _scores(metrics, "val/teacher_", tokenizer, tokens)
    if teacher_model is not None:
        if teacher_row is None:  # no model reads the teacher's tokens: the teacher is scored alone
            metrics, tokens = texts.score(teacher_model, teacher_tokenizer or fallback, None)
            teacher_row = _scores(metrics, "val/", teacher_tokenizer or fallback, tokens)
        rows.insert(0, {"model": f"{teacher} (teacher)", **teacher_row})
    if harness is not None:
        scored = ([(teacher_model, teacher_tokenizer or fallback)] if teacher_model is not None else []) + [
            (model, own_tokenizer or fallback) for _, model, own_tokenizer in loaded
        ]
        for row, (model, model_tokenizer) in zip(rows, scored, strict=True):
            row["lm_eval"] = harness.scores(model, model_tokenizer)
    if output_json:
        write_text(output_json, json.dumps(rows, indent=2) + "\n")
    return rows


@dataclass
class Blocks:
    """The text to score, as blocks of each tokenizer's tokens (made once per tokenizer)."""

    data_files: str | list[str]
    block_size: int
    batch_size: int
    val_fraction: float
    seed: int
    split: Literal["val", "all"]
    progress: bool = True
    made: dict[str, TextDataModule] = field(default_factory=dict)

    def data(self, tokenizer: PreTrainedTokenizerBase) -> TextDataModule:
        """The data module of ``tokenizer``'s blocks (same files, split and packing for every tokenizer)."""
        key = tokenizer_hash(tokenizer)
        if key not in self.made:
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                data = TextDataModule(
                    self.data_files,
                    tokenizer=tmp,
                    block_size=self.block_size,
                    batch_size=self.batch_size,
                    val_fraction=self.val_fraction,
                    seed=self.seed,
                )
                data.setup()
            self.made[key] = data
        return self.made[key]

    def score(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, teacher: nn.Module | None
    ) -> tuple[dict[str, float], int]:
        """``model``'s validation metrics on ``tokenizer``'s blocks (with ``teacher``'s when given, which
        reads the same tokens), and the number of tokens scored."""
        data = self.data(tokenizer)
        blocks = len(data.datasets["val"]) + (len(data.datasets["train"]) if self.split == "all" else 0)
        loader = data.val_dataloader() if self.split == "val" else _all_blocks(data)
        module = DistillationModule(
            student=model, teacher=teacher, vocab_size=data.vocab_size, block_size=self.block_size
        )
        lengths = torch.as_tensor(token_byte_lengths(data.tokenizer))
        for metrics in module.eval_metrics.modules():
            if isinstance(metrics, EvaluationMetrics):
                metrics.set_token_bytes(lengths)  # bpb: the bytes of this tokenizer's tokens
        trainer = L.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.progress,
        )
        return dict(trainer.validate(module, dataloaders=loader, verbose=False)[0]), blocks * self.block_size


def _scores(
    metrics: dict[str, float], prefix: str, tokenizer: PreTrainedTokenizerBase, tokens: int
) -> dict[str, Any]:
    """A row's scores: ``ppl`` and ``bpb`` (under ``prefix``: ``val/`` or ``val/teacher_``), the tokenizer
    they were computed on (its size and a short content hash) and the tokens scored."""
    return {
        "ppl": metrics[f"{prefix}ppl"],
        "bpb": metrics[f"{prefix}bpb"],
        "tokenizer": f"{len(tokenizer)} ({tokenizer_hash(tokenizer)[:8]})",
        "tokens": tokens,
    }


def _all_blocks(data: TextDataModule) -> Any:
    from torch.utils.data import ConcatDataset, DataLoader

    both: ConcatDataset[Any] = ConcatDataset([data.datasets["train"], data.datasets["val"]])
    return DataLoader(both, batch_size=data.batch_size)


def print_rows(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table()
    table.add_column("model", overflow="fold")
    table.add_column("tokenizer")
    for header in ("bits per byte", "ppl (its tokens)", "top-1 agreement", "KL(teacher‖model)"):
        table.add_column(header, justify="right")
    for row in rows:
        agreement = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "-"
        kl = f"{row['kl']:.3f}" if "kl" in row else "-"
        table.add_row(row["model"], row["tokenizer"], f"{row['bpb']:.4f}", f"{row['ppl']:.2f}", agreement, kl)
    console.print(table)
    if any("lm_eval" in row for row in rows):
        print_harness_rows(rows, console)


def print_harness_rows(rows: list[dict[str, Any]], console: Console) -> None:
    """One row per harness task and metric, one column per model."""
    table = Table(title="lm-evaluation-harness")
    table.add_column("task")
    table.add_column("metric")
    for row in rows:
        table.add_column(row["model"], justify="right", overflow="fold")
    pairs = dict.fromkeys(
        (task, metric) for row in rows for task in row["lm_eval"] for metric in row["lm_eval"][task]
    )
    for task, metric in pairs:
        values = [row["lm_eval"].get(task, {}).get(metric) for row in rows]
        table.add_row(task, metric, *("-" if value is None else f"{value:.4g}" for value in values))
    console.print(table)


def evaluate_command(
    models: list[str],
    data_files: str | list[str] = "builtin:python-reference",
    teacher: str | None = None,
    block_size: int | None = None,
    batch_size: int = 16,
    val_fraction: float = 0.1,
    seed: int = 0,
    split: Literal["val", "all"] = "val",
    output_json: str | None = None,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_limit: int | None = None,
    progress: bool = True,
) -> None:
    """Score checkpoints or model directories: bits per byte and perplexity (each with its own tokenizer),
    agreement and KL with a teacher, harness tasks.

    Args:
        models: distilkit checkpoints (``.ckpt``) or Hugging Face model directories.
        data_files: text to score on, as for ``TextDataModule.train_files``.
        teacher: a model to compare against (agreement and KL, for models with its tokenizer).
        block_size: tokens per scored block (default: the checkpoints' training block size, else 128).
        batch_size: blocks scored at once.
        val_fraction: share of documents held out (as in training).
        seed: the seed of the held-out split (as in training).
        split: ``val`` (the held-out documents) or ``all``.
        output_json: where to write the rows (optional; checked before scoring).
        lm_eval_tasks: lm-evaluation-harness tasks to run on every model (names or task YAML files).
        lm_eval_limit: documents per harness task (None: all).
        progress: show progress bars.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per model
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # no notes on defaults and passed-in models
    if output_json:
        check_writable(output_json, "output_json")
    rows = evaluate(
        models,
        data_files,
        teacher,
        block_size,
        batch_size,
        val_fraction,
        seed,
        split,
        lm_eval_tasks=lm_eval_tasks,
        lm_eval_limit=lm_eval_limit,
        progress=progress,
    )
    print_rows(rows, Console())  # printed before the file is written: nothing is lost if that fails
    if output_json:
        write_text(output_json, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {output_json}")
