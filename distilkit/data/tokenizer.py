"""Tokenizers: a Hugging Face tokenizer directory, or a byte-level BPE trained locally and cached."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distilkit.data.gguf import gguf_tokenizer, is_gguf
from distilkit.data.verified import MANIFEST, HashMemo, remember_manifest, verify_directory, write_manifest
from distilkit.errors import ConfigError
from distilkit.files import atomic_directory

EOS = "<|endoftext|>"
TRAIN_SETTINGS = {"vocab_size": 4096, "min_frequency": 2}


def train_bpe(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on ``texts``; ``<|endoftext|>`` is its EOS (and BOS, pad).

    Byte-level means every string encodes: no unknown token is ever needed. ``show_progress`` draws the
    ``tokenizers`` trainer's progress bars (reading, counting pairs, merging) on stderr.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def resolve_tokenizer(
    spec: str | Mapping[str, Any],
    *,
    texts: Callable[[], Iterable[str]],
    fingerprint: str,
    cache_dir: Path,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory or a GGUF file's tokenizer, or train one from settings (cached by training
    data and settings).

    Args:
        spec: a tokenizer (or exported model) directory, a ``.gguf`` file (its tokenizer, converted once into
            ``cache_dir``), or settings such as ``{vocab_size: 4096}``.
        texts: yields the training texts; called only when a tokenizer must be trained.
        fingerprint: identifies the training data, for the cache key.
        cache_dir: where trained tokenizers are kept.
    """
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(TRAIN_SETTINGS)
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(
                f"data.tokenizer.{key}",
                spec[key],
                "is not a tokenizer setting",
                f"use only {sorted(TRAIN_SETTINGS)}",
            )
        settings = {**TRAIN_SETTINGS, **spec}
        if not (isinstance(settings["vocab_size"], int) and settings["vocab_size"] >= 300):
            raise ConfigError(
                "data.tokenizer.vocab_size",
                settings["vocab_size"],
                "must be an integer >= 300",
                "byte-level BPE needs 256 byte tokens plus merges; use e.g. 4096",
            )
        key = hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir / f"tokenizer-{key}"
        memo = HashMemo(cache_dir / "hashes.json")
        if not (path / "tokenizer.json").exists():
            with atomic_directory(path, overwrite=True, field="data.tokenizer") as staging:
                train_bpe(texts(), **settings).save_pretrained(staging)
                manifest = write_manifest(staging, settings=settings)
            remember_manifest(path, manifest, memo)
        elif (path / MANIFEST).exists():  # (one trained before manifests were kept is read as it is)
            verify_directory(
                path,
                memo,
                what="its trained tokenizer",
                field="data.tokenizer",
                value=json.dumps(dict(spec)),
                fix=f"delete it (rm -r {path}): it is trained again",
            )
        return _with_eos(AutoTokenizer.from_pretrained(path), str(path))
    if is_gguf(spec):
        return _with_eos(gguf_tokenizer(spec, field="data.tokenizer", cache_dir=cache_dir), str(spec))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(
            "data.tokenizer",
            spec,
            "is not a directory",
            "give a tokenizer or model directory, a .gguf file, or settings such as {vocab_size: 4096}",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            "data.tokenizer",
            spec,
            f"holds no loadable tokenizer ({err})",
            "point at a directory written by save_pretrained or distilkit export",
        ) from err
    return _with_eos(tokenizer, spec)


def _with_eos(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            "data.tokenizer",
            where,
            "has no EOS token",
            "documents are joined with EOS when packed; use a tokenizer that defines one",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The files ``save_pretrained`` writes, as ``{file name: text}`` (a checkpoint carries them)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_text(encoding="utf-8") for path in Path(tmp).iterdir() if path.is_file()}


def tokenizer_from_files(files: Mapping[str, str]) -> PreTrainedTokenizerBase:
    """The tokenizer that :func:`tokenizer_files` serialised."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of a tokenizer's definition (its ``tokenizer.json``, or its sorted vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_vocabulary(
    reference: PreTrainedTokenizerBase,
    reference_source: str,
    other: PreTrainedTokenizerBase,
    other_source: str,
) -> None:
    """Refuse two tokenizers that do not give the same tokens the same ids (special tokens included):
    equal sizes are not enough, a different BPE of the same size turns every target into another token.

    The error names both sources and the first tokens that differ.
    """
    mine, theirs = reference.get_vocab(), other.get_vocab()
    specials = [(reference.eos_token, other.eos_token), (reference.bos_token, other.bos_token)]
    if mine == theirs and all(a == b for a, b in specials):
        return
    differences = [
        f"{token!r}: id {mine.get(token)} vs {theirs.get(token)}"
        for token in sorted(
            set(mine) | set(theirs), key=lambda t: min(mine.get(t, 1 << 60), theirs.get(t, 1 << 60))
        )
        if mine.get(token) != theirs.get(token)
    ]
    differences += [f"special {a!r} vs {b!r}" for a, b in specials if a != b]
    raise ConfigError(
        other_source,
        f"a vocabulary of {len(theirs)}",
        f"differs from {reference_source}'s {len(mine)} (first differences: {'; '.join(differences[:3])})",
        "train on the teacher's tokenizer: set data.tokenizer to the teacher's directory",
    )
