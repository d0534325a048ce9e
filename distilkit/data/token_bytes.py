"""What text each token id stands for, as UTF-8 bytes: the common ground of two tokenizers.

Two vocabularies spell text differently: a byte-level BPE (GPT-2, Llama 3, Qwen, the project's own) writes
each byte as a printable character (``Ġ`` is the space byte, ``Ċ`` the newline), a SentencePiece-style
vocabulary (Llama 2, Mistral) writes the space as ``▁`` and bytes it has no piece for as byte-fallback
tokens ``<0xE4>``. Both are brought back to the bytes they stand for here, so that token spans and token
strings can be compared across tokenizers (:mod:`distilkit.data.alignment`, :mod:`distilkit.data.vocabulary`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from distilkit.errors import ConfigError

METASPACE = "▁"  # U+2581, SentencePiece's space
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenBytes:
    """The bytes of every id of one tokenizer.

    Attributes:
        pieces: ``pieces[id]``: the UTF-8 bytes the token stands for; None for a special token (EOS, BOS,
            pad ...), which stands for no text.
        lengths: ``(V,)`` int64, ``len(pieces[id])``, 0 for special tokens.
        byte_fallback: ``(V,)`` bool, true for SentencePiece byte-fallback tokens ``<0xXX>``.
        byte_level: whether the vocabulary is written in the byte-level alphabet.
    """

    pieces: tuple[bytes | None, ...]
    lengths: np.ndarray
    byte_fallback: np.ndarray
    byte_level: bool

    def __len__(self) -> int:
        return len(self.pieces)


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> TokenBytes:
    """The bytes each id of a fast (``tokenizers``-backed) tokenizer stands for.

    Byte-level vocabularies (a ``ByteLevel`` pre-tokenizer or decoder) are mapped back through the byte
    alphabet; otherwise ``▁`` is the space and ``<0xXX>`` (with byte fallback) one byte. Added tokens that
    are special stand for no text; other added tokens for their content.

    Raises:
        ConfigError: the tokenizer is not a fast tokenizer (no ``tokenizers`` backend to read it from).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            "tokenizer",
            type(tokenizer).__name__,
            "is not a fast tokenizer: its vocabulary cannot be read as bytes",
            "load it with AutoTokenizer (use_fast=True) or convert it to tokenizer.json",
        )
    return _token_bytes(backend.to_str())


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """``(V,)`` the UTF-8 length of the text each id stands for (0 for special tokens): from the vocabulary
    for a fast tokenizer (:func:`token_bytes`), else by decoding each id alone."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return token_bytes(tokenizer).lengths
    special = set(tokenizer.all_special_ids)
    decoded = [str(tokenizer.decode([i])) for i in range(len(tokenizer))]
    return np.array([0 if i in special else len(text.encode()) for i, text in enumerate(decoded)], np.int64)


@lru_cache(maxsize=8)
def _token_bytes(definition: str) -> TokenBytes:
    spec = json.loads(definition)
    byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(
        spec.get("decoder"), "ByteLevel"
    )
    fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    vocab: dict[str, int] = dict(_model_vocab(spec["model"]))
    added = {entry["content"]: entry for entry in spec.get("added_tokens", [])}
    for entry in added.values():
        vocab[entry["content"]] = entry["id"]
    size = max(vocab.values()) + 1 if vocab else 0
    pieces: list[bytes | None] = [None] * size
    is_fallback = np.zeros(size, dtype=bool)
    decode = _byte_decoder() if byte_level else None
    for token, index in vocab.items():
        entry = added.get(token)
        if entry is not None:
            pieces[index] = None if entry.get("special") else token.encode("utf-8")
        elif decode is not None:
            pieces[index] = decode(token)
        elif fallback and (match := _BYTE_FALLBACK.fullmatch(token)):
            pieces[index], is_fallback[index] = bytes([int(match.group(1), 16)]), True
        else:
            pieces[index] = token.replace(METASPACE, " ").encode("utf-8")
    lengths = np.array([0 if piece is None else len(piece) for piece in pieces], dtype=np.int64)
    return TokenBytes(tuple(pieces), lengths, is_fallback, byte_level)


def _model_vocab(model: dict[str, Any]) -> list[tuple[str, int]]:
    """``(token, id)`` pairs of a ``tokenizers`` model: BPE/WordPiece/WordLevel keep a mapping, Unigram a list
    of ``[piece, score]`` in id order."""
    vocab = model.get("vocab") or {}
    if isinstance(vocab, dict):
        return list(vocab.items())
    return [(entry[0], index) for index, entry in enumerate(vocab)]


def _mentions(component: Any, kind: str) -> bool:
    """Whether a serialised ``tokenizers`` component (possibly a ``Sequence`` of them) is of ``kind``."""
    if isinstance(component, dict):
        return component.get("type") == kind or any(_mentions(value, kind) for value in component.values())
    if isinstance(component, list):
        return any(_mentions(value, kind) for value in component)
    return False


@lru_cache(maxsize=1)
def _byte_decoder():  # type: ignore[no-untyped-def]
    """``token -> bytes`` for the byte-level alphabet (GPT-2's printable stand-in for each of the 256 bytes);
    characters outside it (none in a byte-level vocabulary) are kept as their own UTF-8."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = {char: value for value, char in bytes_to_unicode().items()}

    def decode(token: str) -> bytes:
        if all(char in table for char in token):
            return bytes(table[char] for char in token)
        return token.encode("utf-8")

    return decode
