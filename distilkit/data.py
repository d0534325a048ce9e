"""TextDataModule: documents from local files (or a ``datasets`` name), tokenized once, packed into blocks."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distilkit.corpus import BUILTIN_PREFIX, builtin_corpus_path
from distilkit.errors import ConfigError
from distilkit.sampling import ResumableSampler
from distilkit.tokenizer import resolve_tokenizer

IGNORE_INDEX = -100
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def default_cache_dir() -> Path:
    """``$DISTILKIT_CACHE``, else ``~/.cache/distilkit``."""
    return Path(os.environ.get("DISTILKIT_CACHE", Path.home() / ".cache" / "distilkit"))


class PackedBlocks(Dataset):
    """Fixed-length blocks cut from one token stream, in the Hugging Face causal-LM convention.

    Item ``i`` is ``{"input_ids": (T,), "attention_mask": (T,), "labels": (T,)}`` with labels equal to the
    inputs; the tail of the last, partial block is padding (mask 0, label -100).
    """

    def __init__(self, stream: np.ndarray, block_size: int, pad_id: int) -> None:
        self.block_size = block_size
        blocks = -(-len(stream) // block_size)  # ceil
        padded = np.full(blocks * block_size, pad_id, dtype=np.int64)
        padded[: len(stream)] = stream
        self.tokens = torch.from_numpy(padded).view(blocks, block_size)  # (n_blocks, T)
        self.valid = torch.arange(blocks * block_size).view(blocks, block_size) < len(stream)  # (n_blocks, T)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, valid = self.tokens[index], self.valid[index]
        return {
            "input_ids": ids,
            "attention_mask": valid.long(),
            "labels": torch.where(valid, ids, torch.full_like(ids, IGNORE_INDEX)),
        }


class TextDataModule(L.LightningDataModule):
    """Text from ``.txt`` / ``.jsonl`` / ``.parquet`` files or a ``datasets`` name, packed for a causal LM.

    Each ``.txt`` file is one document; each jsonl line or parquet row is one document (its
    ``text_field``). Documents are tokenized once (cached on disk, keyed by the files and the tokenizer),
    joined with EOS and packed into blocks of ``block_size`` tokens. Without ``val_files`` a deterministic
    ``val_fraction`` of the documents (seeded) is held out; a single document is split at its last tokens.

    Args:
        train_files: paths, ``builtin:python-reference``, or one ``datasets`` name/path.
        val_files: the same forms, or None to hold out part of the training documents.
        text_field: the field holding the text in jsonl/parquet/datasets rows.
        tokenizer: a tokenizer (or exported model) directory, or settings to train a byte-level BPE on the
            training documents: ``{vocab_size: 4096, min_frequency: 2}`` (the default).
        block_size: tokens per training example.
        batch_size: examples per batch.
        val_fraction: share of documents held out when there are no ``val_files``.
        num_workers: data-loader worker processes.
        cache_dir: where tokenizers and token ids are cached (default ``$DISTILKIT_CACHE`` or
            ``~/.cache/distilkit``).
        seed: seeds the held-out split and the shuffling.
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        text_field: str = "text",
        tokenizer: str | dict[str, Any] | None = None,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 2):
                raise ConfigError(f"data.{name}", value, "must be an integer >= 2", "use e.g. 128 or 16")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "must lie in (0, 1)", "use e.g. 0.05")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.train_sources = self._resolve_sources("data.train_files", train_files)
        self.val_sources = None if val_files is None else self._resolve_sources("data.val_files", val_files)
        self.text_field = text_field
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.tokenizer = resolve_tokenizer(
            tokenizer if tokenizer is not None else {},
            texts=lambda: self._documents(self.train_sources, "data.train_files")[self.text_field],
            fingerprint=_fingerprint(self.train_sources, text_field),
            cache_dir=self.cache_dir,
        )
        self.datasets: dict[str, PackedBlocks] = {}
        self._resume_position: tuple[int, int] | None = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size, special tokens included."""
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_docs = self._tokenized(self.train_sources, "data.train_files")
        if self.val_sources is not None:
            train, val = _stream(train_docs), _stream(self._tokenized(self.val_sources, "data.val_files"))
        else:
            train, val = self._split(train_docs)
        pad = int(self.tokenizer.pad_token_id)
        self.datasets = {
            "train": PackedBlocks(train, self.block_size, pad),
            "val": PackedBlocks(val, self.block_size, pad),
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches in an order a resumed run continues exactly (see :meth:`state_dict`).

        Under DDP each process takes its share of every global batch (:class:`.ResumableSampler`), so ``W``
        processes with ``batch_size`` train on what one process with ``W * batch_size`` would."""
        world_size, rank = _world_size_and_rank(self.trainer)
        self.sampler = ResumableSampler(
            len(self.datasets["train"]), self.batch_size, self.seed, num_replicas=world_size, rank=rank
        )
        if self._resume_position is not None:
            self.sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.num_workers,
            generator=self._own_generator(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch being iterated and the batches the loop has finished.

        Counted from the trainer's progress, not the loader's, since the loop fetches a batch ahead.
        """
        sampler = getattr(self, "sampler", None)
        trainer = self.trainer
        if sampler is None or trainer is None:
            return {}
        epoch = int(sampler.epoch)
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress
        done = int(progress.current.processed)  # the batch being finished included
        if done >= trainer.num_training_batches:  # saved at the end of an epoch: the next one is due
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.datasets["val"],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=self._own_generator(),
        )

    def _own_generator(self) -> torch.Generator:
        """Each loader draws its worker seed from this, not from the global generator, so iterating a loader
        does not shift the dropout masks of the training that follows (exact resume needs that)."""
        return torch.Generator().manual_seed(self.seed)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # -------------------------------------------------------------------------------------------- internals
    def _resolve_sources(self, field: str, files: str | Sequence[str]) -> list[str]:
        names = [files] if isinstance(files, str) else list(files)
        if not names:
            raise ConfigError(field, files, "is empty", "give at least one file")
        sources = []
        for name in names:
            if name.startswith(BUILTIN_PREFIX):
                sources.append(str(builtin_corpus_path(name[len(BUILTIN_PREFIX) :], self.cache_dir)))
                continue
            path = Path(name).expanduser()
            if path.suffix in _BUILDERS:
                if not path.is_file():
                    raise ConfigError(
                        field, name, "does not exist", "check the path (relative to where you run)"
                    )
                if not os.access(path, os.R_OK):
                    raise ConfigError(field, name, "is not readable", "fix its permissions")
                if path.suffix != ".parquet":
                    check_utf8(field, path)
                sources.append(str(path.resolve()))
            elif len(names) == 1:
                sources.append(name)  # a datasets name or directory
            else:
                raise ConfigError(
                    field,
                    name,
                    f"has an unknown suffix {path.suffix!r}",
                    f"use {sorted(_BUILDERS)} files, or a single datasets name",
                )
        return sources

    def _documents(self, sources: list[str], field: str) -> datasets.Dataset:
        """All documents of ``sources`` as a Dataset with a ``text_field`` column."""
        parts = []
        by_builder: dict[str, list[str]] = {}
        for source in sources:
            by_builder.setdefault(_BUILDERS.get(Path(source).suffix, ""), []).append(source)
        for builder, files in by_builder.items():
            parts.append(_load(builder, files, field, self.cache_dir))
        docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if self.text_field not in docs.column_names:
            raise ConfigError(
                "data.text_field",
                self.text_field,
                f"is not a column of {field}",
                f"use one of {docs.column_names}",
            )
        docs = docs.select_columns([self.text_field]).filter(lambda row: bool(row[self.text_field]))
        if len(docs) == 0:
            raise ConfigError(
                field, sources, "holds no text", "give files with at least one non-empty document"
            )
        return docs

    def _tokenized(self, sources: list[str], field: str) -> datasets.Dataset:
        """Token ids per document, EOS appended; cached under ``cache_dir`` keyed by files and tokenizer."""
        tokenizer, text_field = self.tokenizer, self.text_field
        eos = self.eos_token_id
        key = hashlib.sha256(
            (_fingerprint(sources, text_field) + _tokenizer_hash(tokenizer)).encode()
        ).hexdigest()[:16]
        cache_file = self.cache_dir / f"tokens-{key}.arrow"

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
            return {"input_ids": [doc + [eos] for doc in ids]}

        docs = self._documents(sources, field)
        return docs.map(
            encode,
            batched=True,
            remove_columns=[text_field],
            cache_file_name=str(cache_file),
            new_fingerprint=key,
            desc="tokenizing",
        )

    def _split(self, docs: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Seeded document-level split; one document is split at its last ``val_fraction`` of tokens."""
        if len(docs) == 1:
            stream = _stream(docs)
            cut = len(stream) - max(self.block_size, int(len(stream) * self.val_fraction))
            if cut < self.block_size:
                raise ConfigError(
                    "data.train_files",
                    self.train_sources,
                    "is too short to hold out a validation block",
                    "give more text, a smaller block_size, or val_files",
                )
            return stream[:cut], stream[cut:]
        train_idx, val_idx = held_out_split(len(docs), self.val_fraction, self.seed)
        return _stream(docs.select(train_idx)), _stream(docs.select(val_idx))


def held_out_split(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, val)`` document indices: a seeded ``val_fraction`` of ``n_docs`` (at least one) is
    held out. The split ``TextDataModule`` makes without ``val_files``; evaluation tasks reuse it."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = max(1, round(n_docs * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _load(builder: str, files: list[str], field: str, cache_dir: Path) -> datasets.Dataset:
    """Load files with a ``datasets`` builder (``text`` reads one document per file), or a dataset by name."""
    hf_cache = str(cache_dir / "datasets")
    try:
        if builder == "text":
            return datasets.load_dataset(
                "text", data_files=files, sample_by="document", split="train", cache_dir=hf_cache
            )
        if builder:
            return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache)
        path = Path(files[0]).expanduser()
        if path.is_dir() and (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(files[0], split="train", cache_dir=hf_cache)
    except UnicodeDecodeError as err:
        raise ConfigError(
            field,
            files,
            f"is not valid UTF-8 ({err.reason} at byte {err.start})",
            "convert the files to UTF-8",
        ) from err
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise ConfigError(
            field,
            files,
            f"could not be read ({_first_line(err)})",
            "give .txt/.jsonl/.parquet files or a datasets name that is available offline",
        ) from err


def _world_size_and_rank(trainer: Any) -> tuple[int, int]:
    """The processes training and this one's rank: from the trainer when attached, else torch.distributed."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def check_utf8(field: str, path: Path, chunk_bytes: int = 2**20) -> None:
    """Refuse a text file that is not valid UTF-8, naming the byte offset (the policy: no silent
    replacement characters in training data; convert the file instead)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ConfigError(
                    field,
                    str(path),
                    f"is not valid UTF-8 ({err.reason} at byte {offset + err.start})",
                    "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
                ) from err
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ConfigError(field, str(path), "ends inside a UTF-8 character", "convert it to UTF-8") from err


def _stream(docs: datasets.Dataset) -> np.ndarray:
    """All token ids of ``docs`` concatenated in order: ``(total_tokens,)`` int64."""
    column = docs.with_format("arrow")["input_ids"]
    return np.asarray(
        column.combine_chunks().flatten() if hasattr(column, "combine_chunks") else column.flatten(),
        dtype=np.int64,
    )


def _fingerprint(sources: Sequence[str], text_field: str) -> str:
    """Identifies the sources' content cheaply: path, size and modification time of each file."""
    parts: list[Any] = [text_field]
    for source in sources:
        path = Path(source)
        parts.append([source, path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else [source])
    return json.dumps(parts)


def _tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
