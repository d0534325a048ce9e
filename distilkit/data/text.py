"""TextDataModule: documents from local files (or a ``datasets`` name), tokenized once, packed into blocks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from distilkit.batch import IGNORE_INDEX
from distilkit.data import chat
from distilkit.data.chat_blocks import ChatBlocks, PackingReport
from distilkit.data.chat_rows import TrainOn, check_chat_settings, conversation_texts
from distilkit.data.domains import DocumentDomains, domain_ids, requested_domains
from distilkit.data.sampler import ResumableSampler
from distilkit.data.sources import (
    FILE_DOMAIN,
    document_domains,
    fingerprint,
    load_documents,
    resolve_sources,
)
from distilkit.data.token_cache import cached_map
from distilkit.data.tokenizer import resolve_tokenizer, tokenizer_hash
from distilkit.errors import ConfigError

#: What a block is drawn from in chat data (the chat fingerprint's field name).
CHAT_FIELD = "messages"


def default_cache_dir() -> Path:
    """``$DISTILKIT_CACHE``, else ``~/.cache/distilkit``."""
    return Path(os.environ.get("DISTILKIT_CACHE", Path.home() / ".cache" / "distilkit"))


class PackedBlocks(Dataset):
    """Fixed-length blocks cut from one token stream, in the Hugging Face causal-LM convention.

    Item ``i`` is ``{"input_ids": (T,), "attention_mask": (T,), "labels": (T,), "block_index": ()}`` with
    labels equal to the inputs; the tail of the last, partial block is padding (mask 0, label -100).
    ``block_index`` is ``i`` itself (a batch carries ``(B,)`` of them): what a teacher cache is read by.
    With ``doc_domains``, items also carry ``domain`` ``(T,)``: the domain id of each token's document (the
    EOS that ends a document is the document's), -1 at padding.

    Args:
        stream: ``(tokens,)`` the documents' token ids, each document followed by EOS.
        block_size: T.
        pad_id: the id written into padding.
        doc_starts: ``(documents,)`` the stream offset where each document begins (for per-document scores).
        doc_domains: ``(documents,)`` each document's domain id (:mod:`distilkit.data.domains`).
    """

    def __init__(
        self,
        stream: np.ndarray,
        block_size: int,
        pad_id: int,
        doc_starts: np.ndarray | None = None,
        doc_domains: np.ndarray | None = None,
    ) -> None:
        self.block_size = block_size
        blocks = -(-len(stream) // block_size)  # ceil
        padded = np.full(blocks * block_size, pad_id, dtype=np.int64)
        padded[: len(stream)] = stream
        self.tokens = torch.from_numpy(padded).view(blocks, block_size)  # (n_blocks, T)
        self.valid = torch.arange(blocks * block_size).view(blocks, block_size) < len(stream)  # (n_blocks, T)
        self.doc_starts = np.zeros(1, dtype=np.int64) if doc_starts is None else doc_starts
        self.domains: torch.Tensor | None = None  # (n_blocks, T) int32
        if doc_domains is not None:
            per_token = np.full(blocks * block_size, -1, dtype=np.int32)
            per_token[: len(stream)] = doc_domains[self.document_of(np.arange(len(stream)))]
            self.domains = torch.from_numpy(per_token).view(blocks, block_size)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, valid = self.tokens[index], self.valid[index]
        item = {
            "input_ids": ids,
            "attention_mask": valid.long(),
            "labels": torch.where(valid, ids, torch.full_like(ids, IGNORE_INDEX)),
            "block_index": torch.tensor(index, dtype=torch.long),
        }
        if self.domains is not None:
            item["domain"] = self.domains[index].long()
        return item

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """The document index of each stream position (``block * T + t``)."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1


class TextDataModule(L.LightningDataModule):
    """Text or conversations from ``.txt`` / ``.jsonl`` / ``.parquet`` files or a ``datasets`` name, packed
    for a causal LM.

    Each ``.txt`` file is one document; each jsonl line or parquet row is one document (its
    ``text_field``). Documents are tokenized once (cached on disk, keyed by the files and the tokenizer,
    checked when read back: :mod:`distilkit.data.token_cache`), joined with EOS and packed into blocks of
    ``block_size`` tokens. Without ``val_files`` a deterministic ``val_fraction`` of the documents (seeded)
    is held out; a single document is split at its last tokens. ``test`` scores ``test_files`` when given,
    else the validation blocks (and says so); ``predict`` scores ``predict_files`` when given, else the
    validation blocks.

    Chat rows (jsonl or parquet rows with ``messages``, or ``prompt`` and ``completion``:
    :mod:`distilkit.data.chat`) are rendered with the chat template, trained on the assistant's tokens
    (``train_on``), and packed whole into blocks whose attention never crosses a conversation
    (:class:`~distilkit.data.chat_blocks.ChatBlocks`; batches add ``position_ids`` and ``assistant_mask``).
    A conversation longer than ``block_size`` is truncated, and what that drops is reported at setup.

    Plain-text documents can carry a domain (``domains``, :mod:`distilkit.data.domains`): batches then hold
    ``domain`` ``(B, T)``, each token's document's id in :attr:`domain_names` (-1 at padding), by which
    several teachers are routed and validation logs ``val/<domain>/ppl``. A data module given no
    ``domains`` carries what the module it trains asks for (its ``domains``: a ``DistillationModule``'s
    ``route_by``). Blocks, token caches and :meth:`identity` are the same with or without domains.

    Args:
        train_files: paths, ``builtin:python-reference`` (prose), ``builtin:python-code`` (the standard
            library's source), or one ``datasets`` name/path.
        val_files: the same forms, or None to hold out part of the training documents.
        test_files: the same forms: what ``distilkit test`` scores (default: the validation split).
        predict_files: the same forms: what ``distilkit predict`` scores (default: the validation split).
        text_field: the field holding the text in jsonl/parquet/datasets rows.
        tokenizer: a tokenizer (or exported model) directory, or settings to train a byte-level BPE on the
            training documents: ``{vocab_size: 4096, min_frequency: 2}`` (the default).
        block_size: tokens per training example.
        batch_size: examples per batch (per process).
        val_fraction: share of documents held out when there are no ``val_files``.
        num_workers: data-loader worker processes.
        cache_dir: where tokenizers and token ids are cached (default ``$DISTILKIT_CACHE`` or
            ``~/.cache/distilkit``).
        seed: seeds the held-out split and the shuffling.
        skip_missing_text: train without the jsonl/parquet rows that have no ``text_field`` (counted and
            warned about) instead of refusing them.
        chat_template: chat rows only: the Jinja template to render conversations with (its text, or a
            file holding it); default: the tokenizer's own. It becomes the tokenizer's template (checkpoints
            and exports carry it).
        train_on: chat rows only: ``assistant`` (the default: loss on the assistant's tokens, every turn)
            or ``all`` (every token).
        domains: plain text only: the row field that names each document's domain (its value as text), or
            ``file``: the data file it came from (a built-in corpus by its name, ``python-code``; a file by
            its stem). Default: what the trained module asks for, else none.
        split_per_file: plain text without ``val_files``: hold out ``val_fraction`` of each training file's
            documents on its own (seeded as a run on that file alone would), so teachers trained on one file
            each hold out the same documents as a student trained on them all.
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        text_field: str = "text",
        tokenizer: str | dict[str, Any] | None = None,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        skip_missing_text: bool = False,
        chat_template: str | None = None,
        train_on: TrainOn | None = None,
        domains: str | None = None,
        split_per_file: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (("block_size", block_size, 2), ("batch_size", batch_size, 1)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ConfigError(f"data.{name}", value, f"must be an integer >= {low}", "use e.g. 128 or 16")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "must lie in (0, 1)", "use e.g. 0.05")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.train_sources = resolve_sources("data.train_files", train_files, self.cache_dir)
        self.val_sources = self._optional_sources("val_files", val_files)
        self.test_sources = self._optional_sources("test_files", test_files)
        self.predict_sources = self._optional_sources("predict_files", predict_files)
        self.text_field, self.skip_missing_text = text_field, skip_missing_text
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        splits = {"train": self.train_sources, "val": self.val_sources}
        splits |= {"test": self.test_sources, "predict": self.predict_sources}
        self.chat = check_chat_settings(splits, chat_template, train_on, text_field)
        self.train_on: TrainOn = train_on or ("assistant" if self.chat else "all")
        self.tokenizer = resolve_tokenizer(
            tokenizer if tokenizer is not None else {},
            texts=self._tokenizer_texts,
            fingerprint=fingerprint(self.train_sources, CHAT_FIELD if self.chat else text_field),
            cache_dir=self.cache_dir,
        )
        self.chat_template: str | None = None
        if self.chat:
            self.chat_template = chat.resolve_chat_template(chat_template, self.tokenizer, tokenizer)
            self.tokenizer.chat_template = self.chat_template
        self.datasets: dict[str, PackedBlocks | ChatBlocks] = {}
        self.packing_reports: dict[str, PackingReport] = {}
        if domains is not None and (self.chat or not domains):
            problem = "is for plain text (chat rows carry no domain)" if self.chat else "is empty"
            raise ConfigError("data.domains", domains, problem, "drop data.domains, or name a row field")
        self.domains = domains
        if split_per_file and self.chat:
            raise ConfigError("data.split_per_file", True, "is for plain text", "drop it for chat rows")
        self.split_per_file = split_per_file and self.val_sources is None and len(self.train_sources) > 1
        self.document_domains: DocumentDomains | None = None  # what the blocks carry, set at setup
        self._given = {
            key: (files, sources)
            for key, files, sources in (
                ("train", train_files, self.train_sources), ("val", val_files, self.val_sources),
                ("test", test_files, self.test_sources), ("predict", predict_files, self.predict_sources),
            )
        }  # fmt: skip
        self._resume_position: tuple[int, int] | None = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size, special tokens included."""
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends an assistant turn (chat data: ``<|im_end|>`` for ChatML; the EOS id for a
        template without a marker, and for plain text): where sampling a reply stops."""
        if self.chat_template is None:
            return self.eos_token_id
        return chat.end_of_turn_id(self.tokenizer, self.chat_template)

    def identity(self) -> dict[str, Any]:
        """What the blocks of this data module are made from (content hashes, tokenizer, packing, split):
        two data modules with equal identities give the same blocks in the same splits. A teacher cache
        compares it with the identity it was built from."""
        split = {"val_fraction": self.val_fraction, "seed": self.seed} if self.val_sources is None else {}
        split |= {"split_per_file": True} if self.split_per_file else {}
        field = CHAT_FIELD if self.chat else self.text_field
        packing = (
            {"chat_template": chat.template_hash(self.chat_template), "packing": chat.ENCODING_VERSION}
            if self.chat_template is not None
            else {}
        )
        return {
            "train_data": fingerprint(self.train_sources, field),
            "val_data": None if self.val_sources is None else fingerprint(self.val_sources, field),
            "tokenizer": tokenizer_hash(self.tokenizer),
            "block_size": self.block_size,
            **split,
            **packing,
        }

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def domain_field(self) -> str | None:
        """The row field (or ``file``) the blocks' ``domain`` ids come from; None when they carry none."""
        return None if self.document_domains is None else self.document_domains.field

    @property
    def domain_names(self) -> list[str | None]:
        """Domain id -> name (None: rows without the field); empty without domains."""
        return [] if self.document_domains is None else self.document_domains.names

    def setup(self, stage: str | None = None) -> None:
        field = self.domains if self.domains is not None or self.chat else requested_domains(self.trainer)
        if field != self.domain_field:  # blocks made before a module asked for domains are made again
            self.datasets = {}
            self.document_domains = None if field is None else DocumentDomains(field, self._given)
        if not self.datasets:
            train_docs = self._tokenized(self.train_sources, "data.train_files")
            if self.val_sources is not None:
                val_docs = self._tokenized(self.val_sources, "data.val_files")
            else:
                train_docs, val_docs = self._split(train_docs)
            self.datasets = {"train": self._blocks(train_docs, "train"), "val": self._blocks(val_docs, "val")}
        for split, sources in (("test", self.test_sources), ("predict", self.predict_sources)):
            if stage == split and split not in self.datasets:
                tokenized = None if sources is None else self._tokenized(sources, f"data.{split}_files")
                blocks = self.datasets["val"] if tokenized is None else self._blocks(tokenized, split)
                self.datasets[split] = blocks

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches in an order a resumed run continues exactly (see :meth:`state_dict`).

        Under DDP each process takes its share of every global batch (:class:`.ResumableSampler`), so ``W``
        processes with ``batch_size`` train on what one process with ``W * batch_size`` would."""
        world_size, rank = _world_size_and_rank(self.trainer)
        blocks = len(self.datasets["train"])
        if blocks < self.batch_size * world_size:
            raise ConfigError(
                "data.batch_size",
                self.batch_size,
                f"needs {self.batch_size * world_size} training blocks for one batch ({world_size} "
                f"processes) but the data makes {blocks} blocks of {self.block_size} tokens",
                "lower data.batch_size or data.block_size, or give more text",
            )
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

    def val_dataloader(self) -> DataLoader:
        return self._in_order("val")

    def test_dataloader(self) -> DataLoader:
        """The ``test_files`` blocks, or (said once) the validation blocks when there are none."""
        if self.test_sources is None:
            rank_zero_warn("data.test_files is not set: `test` scores the validation split")
        return self._in_order("test")

    def predict_dataloader(self) -> DataLoader:
        """The predict blocks in order (``predict_files``, or the validation split)."""
        return self._in_order("predict")

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

    # -------------------------------------------------------------------------------------------- internals
    def _optional_sources(self, name: str, files: str | list[str] | None) -> list[str] | None:
        return None if files is None else resolve_sources(f"data.{name}", files, self.cache_dir)

    def _tokenizer_texts(self) -> Any:
        """What a tokenizer trained for this data learns from: the documents, or the messages' contents."""
        if self.chat:
            return conversation_texts("data.train_files", self.train_sources)
        return self._documents(self.train_sources, "data.train_files")[self.text_field]

    def _in_order(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=self._own_generator(),
        )

    def _own_generator(self) -> torch.Generator:
        """Each loader draws its worker seed from this, not from the global generator, so iterating a loader
        does not shift the dropout masks of the training that follows (exact resume needs that)."""
        return torch.Generator().manual_seed(self.seed)

    def _blocks(self, docs: datasets.Dataset, split: str) -> PackedBlocks | ChatBlocks:
        pad = int(self.tokenizer.pad_token_id)
        if not self.chat:
            stream, starts = _stream(docs)
            return PackedBlocks(stream, self.block_size, pad, starts, domain_ids(docs))
        ids, offsets = _lists(docs, "input_ids")
        assistant, _ = _lists(docs, "assistant")
        blocks = ChatBlocks(ids, assistant, offsets, self.block_size, pad, self.train_on, split)
        self.packing_reports[split] = blocks.report
        (rank_zero_warn if blocks.report.dropped_targets else rank_zero_info)(blocks.report.line())
        return blocks

    def _documents(self, sources: list[str], field: str) -> datasets.Dataset:
        return load_documents(sources, field, self.text_field, self.cache_dir, self.skip_missing_text)

    def _tokenized(self, sources: list[str], field: str) -> datasets.Dataset:
        """Token ids per document, EOS appended; cached under ``cache_dir`` keyed by files and tokenizer
        (and checked when read back). Chat rows: :func:`.chat.encoded_conversations`."""
        if self.chat:
            assert self.chat_template is not None
            return chat.encoded_conversations(
                field, sources, self.tokenizer, self.chat_template, self.train_on, self.cache_dir
            )
        tokenizer, text_field = self.tokenizer, self.text_field
        eos = self.eos_token_id
        key = hashlib.sha256(
            (fingerprint(sources, text_field) + tokenizer_hash(tokenizer)).encode()
        ).hexdigest()[:16]

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
            return {"input_ids": [doc + [eos] for doc in ids]}

        docs = self._documents(sources, field)
        tokens = cached_map(docs, encode, self.cache_dir / f"tokens-{key}.arrow", key, [text_field])
        if self.document_domains is None:
            return tokens
        loading = {"cache_dir": self.cache_dir, "skip_missing_text": self.skip_missing_text}
        return self.document_domains.column(tokens, sources, field, text_field=text_field, **loading)

    def _split(self, docs: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Seeded document-level split; one document is split at its last ``val_fraction`` of tokens
        (a single conversation cannot be split)."""
        if len(docs) == 1 and self.chat:
            raise ConfigError(
                "data.train_files", self.train_sources, "hold one conversation: none can be held out",
                "give more conversations, or data.val_files",
            )  # fmt: skip
        if len(docs) == 1:
            ids = docs[0]["input_ids"]
            cut = len(ids) - max(self.block_size, int(len(ids) * self.val_fraction))
            if cut < self.block_size:
                raise ConfigError(
                    "data.train_files",
                    self.train_sources,
                    "is too short to hold out a validation block",
                    "give more text, a smaller block_size, or val_files",
                )
            domain = {"domain": docs["domain"]} if "domain" in docs.column_names else {}
            head = datasets.Dataset.from_dict({"input_ids": [ids[:cut]], **domain})
            tail = datasets.Dataset.from_dict({"input_ids": [ids[cut:]], **domain})
            return head, tail
        if self.split_per_file:
            files = document_domains(
                self.train_sources, "data.train_files", self.text_field, FILE_DOMAIN, self.cache_dir,
                self.skip_missing_text, names={source: source for source in self.train_sources},
            )  # fmt: skip
            train_idx, val_idx = held_out_per_group(files, self.val_fraction, self.seed)
        else:
            train_idx, val_idx = held_out_split(len(docs), self.val_fraction, self.seed)
        return docs.select(train_idx), docs.select(val_idx)


def held_out_split(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, val)`` document indices: a seeded ``val_fraction`` of ``n_docs`` (at least one) is
    held out. The split ``TextDataModule`` makes without ``val_files``; evaluation tasks reuse it."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = max(1, round(n_docs * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def held_out_per_group(groups: list[Any], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, val)`` document indices: :func:`held_out_split` of each group's documents on its own
    (``groups``: each document's group, e.g. its file)."""
    labels = np.asarray([str(group) for group in groups])
    train, val = [], []
    for group in dict.fromkeys(labels):
        members = np.flatnonzero(labels == group)
        if len(members) < 2:
            raise ConfigError(
                "data.split_per_file", group, "has one document: none can be held out on its own",
                "give it more documents, or drop split_per_file",
            )  # fmt: skip
        own_train, own_val = held_out_split(len(members), val_fraction, seed)
        train.append(members[own_train])
        val.append(members[own_val])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _world_size_and_rank(trainer: Any) -> tuple[int, int]:
    """The processes training and this one's rank: from the trainer when attached, else torch.distributed."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _lists(docs: datasets.Dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of ``docs`` as its values one after another ``(total,)`` and the offsets of each row
    in them ``(rows + 1,)``, starting at 0."""
    lists = docs.with_format("arrow")[column]
    combined = lists.combine_chunks() if hasattr(lists, "combine_chunks") else lists
    values = np.asarray(combined.flatten())
    offsets = np.asarray(combined.offsets, dtype=np.int64)
    return values, offsets - offsets[0]


def _stream(docs: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All token ids of ``docs`` concatenated in order ``(total_tokens,)`` int64, and where each document
    starts in that stream ``(documents,)``."""
    column = docs.with_format("arrow")["input_ids"]
    chunked = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    stream = np.asarray(chunked.flatten(), dtype=np.int64)
    starts = np.asarray(chunked.offsets, dtype=np.int64)[:-1] if len(chunked) else np.zeros(0, dtype=np.int64)
    return stream, starts - (starts[0] if len(starts) else 0)
