"""``distilkit evaluate``: perplexity of models on data, and their agreement and KL with a teacher.

Each model is scored by :class:`DistillationModule`'s own validation loop (the metrics of training,
``val/ppl``, ``val/top1_agreement``, ``val/kl``) on the held-out split that training used (same files,
``val_fraction`` and seed), or on all blocks with ``--split all``. With the ``eval`` extra,
``--lm_eval_tasks`` also runs EleutherAI's lm-evaluation-harness on every model
(:mod:`distilkit.commands.harness`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from typing import Any, Literal

import lightning as L
from rich.console import Console
from rich.table import Table
from rich.text import Text

from distilkit.commands.harness import Harness
from distilkit.data import TextDataModule
from distilkit.data.tokenizer import check_same_vocabulary
from distilkit.errors import ConfigError
from distilkit.files import check_writable, write_text
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

    Args:
        models: distilkit checkpoints (``.ckpt``) or Hugging Face model directories.
        data_files: text to score on, as for ``TextDataModule.train_files``.
        teacher: a model to compare against (agreement, KL); its tokenizer is used when given.
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
    teacher_model, tokenizer = load_model_and_tokenizer(teacher, "teacher") if teacher else (None, None)
    loaded = [(name, *load_model_and_tokenizer(name, "models")) for name in models]
    tokenizer = tokenizer or next((t for _, _, t in loaded if t is not None), None)
    if tokenizer is None:
        raise ConfigError("models", models, "carry no tokenizer", "export them with distilkit export first")
    reference = f"teacher ({teacher})" if teacher else f"models[0] ({models[0]})"
    for index, (name, _, own) in enumerate(loaded):
        if own is not None:
            check_same_vocabulary(tokenizer, reference, own, f"models[{index}] ({name})")
    if block_size is None:
        trained = [size for size in map(trained_block_size, models) if size is not None]
        block_size = min(trained) if trained else 128
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = TextDataModule(
            data_files,
            tokenizer=tmp,
            block_size=block_size,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
        )
        data.setup()
    blocks = len(data.datasets["val"]) + (len(data.datasets["train"]) if split == "all" else 0)
    loader = data.val_dataloader() if split == "val" else _all_blocks(data)
    rows = []
    for name, model, _ in loaded:
        module = DistillationModule(
            student=model, teacher=teacher_model, vocab_size=data.vocab_size, block_size=block_size
        )
        trainer = L.Trainer(
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress
        )
        metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]
        row: dict[str, Any] = {"model": name, "ppl": metrics["val/ppl"]}
        if teacher_model is not None:
            row.update(top1_agreement=metrics["val/top1_agreement"], kl=metrics["val/kl"])
            teacher_row = {"model": f"{teacher} (teacher)", "ppl": metrics["val/teacher_ppl"]}
        rows.append(row)
    if teacher_model is not None:
        rows.insert(0, teacher_row)
    for row in rows:
        row["tokens"] = blocks * block_size
    if harness is not None:
        scored = ([(teacher_model, tokenizer)] if teacher_model is not None else []) + [
            (model, own_tokenizer or tokenizer) for _, model, own_tokenizer in loaded
        ]
        for row, (model, model_tokenizer) in zip(rows, scored, strict=True):
            row["lm_eval"] = harness.scores(model, model_tokenizer)
    if output_json:
        write_text(output_json, json.dumps(rows, indent=2) + "\n")
    return rows


def _all_blocks(data: TextDataModule) -> Any:
    from torch.utils.data import ConcatDataset, DataLoader

    both: ConcatDataset[Any] = ConcatDataset([data.datasets["train"], data.datasets["val"]])
    return DataLoader(both, batch_size=data.batch_size)


def print_rows(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table()
    table.add_column("model", overflow="fold")
    for header in ("ppl", "top-1 agreement", "KL(teacher‖model)"):
        table.add_column(header, justify="right")
    for row in rows:
        agreement = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "-"
        kl = f"{row['kl']:.3f}" if "kl" in row else "-"
        table.add_row(Text(row["model"]), f"{row['ppl']:.2f}", agreement, kl)  # Text: printed as written
    console.print(table)
    if any("lm_eval" in row for row in rows):
        print_harness_rows(rows, console)


def print_harness_rows(rows: list[dict[str, Any]], console: Console) -> None:
    """One row per harness task and metric, one column per model."""
    table = Table(title="lm-evaluation-harness")
    table.add_column("task")
    table.add_column("metric")
    for row in rows:
        table.add_column(Text(row["model"]), justify="right", overflow="fold")
    pairs = dict.fromkeys(
        (task, metric) for row in rows for task in row["lm_eval"] for metric in row["lm_eval"][task]
    )
    for task, metric in pairs:
        values = [row["lm_eval"].get(task, {}).get(metric) for row in rows]
        cells = ("-" if value is None else f"{value:.4g}" for value in values)
        table.add_row(Text(task), Text(metric), *cells)
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
    """Score checkpoints or model directories: perplexity, agreement and KL with a teacher, harness tasks.

    Args:
        models: distilkit checkpoints (``.ckpt``) or Hugging Face model directories.
        data_files: text to score on, as for ``TextDataModule.train_files``.
        teacher: a model to compare against (agreement, KL); its tokenizer is used when given.
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
