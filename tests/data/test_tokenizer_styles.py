"""Tokenizers trained from settings: ``style: sentencepiece`` (issue 23) trains another family than the
default byte-level BPE on the same text, whose tokens still spell the text exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from distilkit.data.alignment import byte_ends
from distilkit.data.token_bytes import token_bytes
from distilkit.data.tokenizer import resolve_tokenizer
from distilkit.errors import ConfigError

HARD = [
    "café naïve — déjà vu",
    "emoji 😀👍🏽 and CJK 日本語",
    "a  b   c\t\td\n\n\ne",
    "def f(x):\n    return {'k': x ** 2}  # ≥ 2",
]


def trained(corpus: Path, tmp_path: Path, **settings):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    return resolve_tokenizer(settings, texts=lambda: texts, fingerprint="corpus", cache_dir=tmp_path)


def test_a_sentencepiece_style_bpe_spells_every_text_exactly_with_byte_fallback(corpus, tmp_path):
    tokenizer = trained(corpus, tmp_path, vocab_size=400, style="sentencepiece")
    assert len(tokenizer) == 400 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    table = token_bytes(tokenizer)
    assert not table.byte_level and int(table.byte_fallback.sum()) == 256
    for text in HARD:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert b"".join(table.pieces[i] for i in ids) == text.encode("utf-8")  # no ▁ put before the text
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert byte_ends(text, ids, offsets, table)[-1] == len(text.encode("utf-8"))
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" the  word")["input_ids"])
    assert any(piece.startswith("▁") for piece in pieces)


def test_the_style_is_part_of_the_cache_key_and_the_default_keeps_its_old_key(corpus, tmp_path):
    byte_level = trained(corpus, tmp_path, vocab_size=400)
    sentencepiece = trained(corpus, tmp_path, vocab_size=400, style="sentencepiece")
    assert byte_level.get_vocab() != sentencepiece.get_vocab()
    assert token_bytes(byte_level).byte_level
    again = trained(corpus, tmp_path, vocab_size=400, style="byte_level")
    assert again.name_or_path == byte_level.name_or_path
    settings = {"vocab_size": 400, "min_frequency": 2}  # the key before styles: caches made then still count
    key = hashlib.sha256(json.dumps(["corpus", settings], sort_keys=True).encode()).hexdigest()[:16]
    assert Path(byte_level.name_or_path).name == f"tokenizer-{key}"
    assert len(list(tmp_path.glob("tokenizer-*"))) == 2


def test_an_unknown_style_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer.style='unigram': is not a tokenizer style"):
        trained(corpus, tmp_path, vocab_size=400, style="unigram")
