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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from distilkit.commands.harness import Harness
from distilkit.commands.kept_rows import KeptRows, identity_of
from distilkit.commands.quiet import log_levels
from distilkit.data import TextDataModule
from distilkit.data.token_bytes import token_byte_lengths
from distilkit.data.tokenizer import same_vocabulary, tokenizer_hash
from distilkit.errors import ConfigError, RunInterrupted, fields_as_typed
from distilkit.files import check_output_file, write_text
from distilkit.metrics import EvaluationMetrics
from distilkit.models.checkpoint import (
    checkpoint_tokenizer,
    load_model_and_tokenizer,
    model_from_checkpoint,
    model_prefix,
    peer_names,
    read_checkpoint,
    trained_block_size,
)
from distilkit.modules import DistillationModule
from distilkit.run.signals import GracefulStop

#: The data module's fields as ``evaluate`` takes them on its command line.
DATA_FIELDS = {
    "data.train_files": "data_files",
    "data.block_size": "block_size",
    "data.batch_size": "batch_size",
    "data.val_fraction": "val_fraction",
    "data.seed": "seed",
}


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
    peer: int | str | None = None,
) -> list[dict[str, Any]]:
    """Score each model; returns one row per model (and one for the teacher), also written as JSON.

    Every model reads the text with its own tokenizer (a model without one with the teacher's, else the first
    model's): the same documents (the held-out split is drawn by document) packed into blocks of its own
    tokens. ``ppl`` is per token of the model's tokenizer; ``bpb`` (bits per byte of the predicted text)
    compares models with different tokenizers. Agreement and KL with the teacher are computed for the
    models that share its tokenizer.

    Each row is kept by content as soon as it is scored (:class:`~distilkit.commands.kept_rows.KeptRows`):
    a rerun after Ctrl-C, or with one more model, scores only the models it has no row for.

    Args:
        models: distilkit checkpoints (``.ckpt``) or Hugging Face model directories. A cohort's checkpoint
            gives a row per peer (``peer`` picks one).
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
        peer: the peer of a cohort checkpoint to score, by index or name (default: every peer).

    Raises:
        RunInterrupted: Ctrl-C; the rows of the models scored so far are kept.
    """
    if not models:
        raise ConfigError("models", models, "is empty", "give at least one checkpoint or model directory")
    if output_json:
        check_output_file(output_json, "output_json")
    harness = Harness(lm_eval_tasks, limit=lm_eval_limit, batch_size=batch_size) if lm_eval_tasks else None
    teacher_model, teacher_tokenizer = (
        load_model_and_tokenizer(teacher, "teacher") if teacher else (None, None)
    )
    loaded = [entry for index, name in enumerate(models) for entry in _load(name, index, peer)]
    fallback = teacher_tokenizer or next((e.tokenizer for e in loaded if e.tokenizer is not None), None)
    if fallback is None:
        raise ConfigError("models", models, "carry no tokenizer", "export them with distilkit export first")
    if block_size is None:
        trained = [size for size in map(trained_block_size, models) if size is not None]
        block_size = min(trained) if trained else 128
    texts = Blocks(data_files, block_size, batch_size, val_fraction, seed)
    kept = KeptRows("evaluate")
    stop = GracefulStop("this batch; the rows of the models scored so far are kept", "those rows are kept")
    rows: list[dict[str, Any]] = []
    teacher_row: dict[str, Any] | None = None
    with stop:
        for number, entry in enumerate(loaded):
            tokenizer = entry.tokenizer or fallback
            shared = teacher_tokenizer is None or same_vocabulary(teacher_tokenizer, tokenizer)
            beside = teacher_model if shared else None  # agreement and KL need one vocabulary
            data = texts.data(tokenizer)
            settings = {"data": data.identity(), "split": split, "batch_size": batch_size}
            key = kept.key(
                kind="validation", model=identity_of(entry.name), prefix=entry.prefix,
                teacher=identity_of(teacher) if beside is not None else None, **settings,
            )  # fmt: skip
            row = kept.get(key)
            if row is None:
                if stop.requested:
                    raise _interrupted(number, len(loaded))
                row = _score(entry, beside, data, split, block_size, progress, stop, number, len(loaded))
                kept.put(key, row)
            teacher_scores = {name: row.pop(name) for name in ("teacher_ppl", "teacher_bpb") if name in row}
            if teacher_row is None and teacher_scores:
                teacher_row = {
                    "ppl": teacher_scores["teacher_ppl"], "bpb": teacher_scores["teacher_bpb"],
                    "tokenizer": row["tokenizer"], "tokens": row["tokens"],
                }  # fmt: skip
            rows.append({**row, "model": entry.label})
        if teacher_model is not None and teacher_row is None:  # no model reads its tokens: scored alone
            assert teacher is not None
            alone = Scored("teacher", teacher, None, teacher, teacher_model, teacher_tokenizer)
            data = texts.data(teacher_tokenizer or fallback)
            teacher_row = _score(alone, None, data, split, block_size, progress, stop, 0, 1)
    if teacher_row is not None:
        rows.insert(0, {"model": f"{teacher} (teacher)", **teacher_row})
    if harness is not None:
        scored = (
            [(teacher, None, teacher_model, teacher_tokenizer or fallback)]
            if teacher_model is not None
            else []
        ) + [(entry.name, entry.prefix, entry.model, entry.tokenizer or fallback) for entry in loaded]
        tasks = {"tasks": [identity_of(t) for t in lm_eval_tasks or []], "limit": lm_eval_limit}
        tasks["batch_size"] = batch_size
        with stop:
            for number, (row, (name, prefix, model, model_tokenizer)) in enumerate(
                zip(rows, scored, strict=True)
            ):
                key = kept.key(kind="lm_eval", model=identity_of(name), prefix=prefix, **tasks)
                scores = kept.get(key)
                if scores is None:
                    if stop.requested:
                        raise _interrupted(number, len(scored), "models on the harness tasks")
                    scores = harness.scores(model, model_tokenizer)
                    kept.put(key, scores)
                row["lm_eval"] = scores
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

    def __post_init__(self) -> None:
        self.made: dict[str, TextDataModule] = {}

    def data(self, tokenizer: Any) -> TextDataModule:
        """The data module of ``tokenizer``'s blocks (same files, split and packing for every tokenizer)."""
        key = tokenizer_hash(tokenizer)
        if key not in self.made:
            with tempfile.TemporaryDirectory() as tmp, fields_as_typed(DATA_FIELDS):
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


@dataclass(frozen=True)
class Scored:
    """A model ``evaluate`` scores: where it came from (``models[i]``, the file, the state-dict prefix), the
    label of its row, the model and its own tokenizer (None without one)."""

    field: str
    name: str
    prefix: str | None
    label: str
    model: Any
    tokenizer: Any


def _load(name: str, index: int, peer: int | str | None) -> list[Scored]:
    """The models ``models[index]`` names: one, or each peer of a cohort checkpoint (or just ``peer``)."""
    field = f"models[{index}]"
    if Path(name).suffix == ".ckpt" and Path(name).is_file():
        checkpoint = read_checkpoint(name, field)
        peers = peer_names(checkpoint)
        prefixes = [model_prefix(checkpoint, peer)] if peer is not None or not peers else list(peers)
        tokenizer = checkpoint_tokenizer(checkpoint)
        return [
            Scored(
                field,
                name,
                prefix,
                f"{name} (peer {peers[prefix]})" if prefix in peers else name,
                model_from_checkpoint(checkpoint, prefix, where=field),
                tokenizer,
            )  # fmt: skip
            for prefix in prefixes
        ]
    model, tokenizer = load_model_and_tokenizer(name, field)
    return [Scored(field, name, None, name, model, tokenizer)]


def _score(
    entry: Scored,
    teacher: Any,
    data: TextDataModule,
    split: Literal["val", "all"],
    block_size: int,
    progress: bool,
    stop: GracefulStop,
    number: int,
    count: int,
) -> dict[str, Any]:
    """One model's row on ``data``'s blocks (of its own tokenizer): ``ppl``, ``bpb``, ``tokenizer``,
    ``tokens`` (and with a teacher that reads the same tokens ``top1_agreement``, ``kl``, ``teacher_ppl``,
    ``teacher_bpb``)."""
    blocks = len(data.datasets["val"]) + (len(data.datasets["train"]) if split == "all" else 0)
    loader = data.val_dataloader() if split == "val" else _all_blocks(data)
    with fields_as_typed({"model.student": entry.field, "model.teacher": "teacher", **DATA_FIELDS}):
        module = DistillationModule(
            student=entry.model, teacher=teacher, vocab_size=data.vocab_size, block_size=block_size
        )
    lengths = torch.as_tensor(token_byte_lengths(data.tokenizer))
    for observed in module.eval_metrics.modules():
        if isinstance(observed, EvaluationMetrics):
            observed.set_token_bytes(lengths)  # bpb: the bytes of this tokenizer's tokens
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[StopWhenAsked(stop)],
    )
    try:
        metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    except RunInterrupted as err:
        raise _interrupted(number, count) from err
    tokenizer = data.tokenizer
    row: dict[str, Any] = {
        "ppl": metrics["val/ppl"],
        "bpb": metrics["val/bpb"],
        "tokenizer": f"{len(tokenizer)} ({tokenizer_hash(tokenizer)[:8]})",
        "tokens": blocks * block_size,
    }
    if teacher is not None:
        row.update(
            top1_agreement=metrics["val/top1_agreement"],
            kl=metrics["val/kl"],
            teacher_ppl=metrics["val/teacher_ppl"],
            teacher_bpb=metrics["val/teacher_bpb"],
        )
    return row


class StopWhenAsked(L.Callback):
    """Stops a validation at the end of the batch during which Ctrl-C came (:class:`GracefulStop`)."""

    def __init__(self, stop: GracefulStop) -> None:
        self.stop = stop

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.stop.requested:
            raise RunInterrupted("Ctrl-C")


def _interrupted(scored: int, count: int, what: str = "models") -> RunInterrupted:
    return RunInterrupted(
        f"Ctrl-C: {scored} of {count} {what} scored (their rows are kept); "
        "run the same command again to score only the rest"
    )


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
        bpb = f"{row['bpb']:.4f}" if "bpb" in row else "-"
        cells = (bpb, f"{row['ppl']:.2f}", agreement, kl)
        table.add_row(Text(row["model"]), Text(str(row.get("tokenizer", "-"))), *cells)  # Text: as written
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
    peer: int | str | None = None,
) -> None:
    """Score checkpoints or model directories: bits per byte and perplexity (each with its own tokenizer),
    agreement and KL with a teacher, harness tasks.

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
        peer: the peer of a cohort checkpoint to score, by index or name (default: a row for every peer).
    """
    if output_json:
        check_output_file(output_json, "output_json")
    quiet = {"lightning.pytorch": logging.WARNING, "lm_eval": logging.ERROR}  # no banner per model, no notes
    with log_levels(quiet):
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
            peer=peer,
        )
    print_rows(rows, Console())  # printed before the file is written: nothing is lost if that fails
    if output_json:
        write_text(output_json, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {output_json}")
