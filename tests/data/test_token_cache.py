"""Token caches are checked when read back: changed bytes are caught and the cache rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distilkit import TextDataModule
from distilkit.data import token_cache


def blocks(corpus: Path, tokenizer_dir: Path, cache_dir: Path) -> torch.Tensor:
    data = TextDataModule(
        str(corpus), tokenizer=str(tokenizer_dir), block_size=32, val_fraction=0.1, cache_dir=str(cache_dir)
    )
    data.setup()
    return data.datasets["train"].tokens


def only_cache(cache_dir: Path) -> Path:
    (found,) = cache_dir.glob("tokens-*.arrow")
    return found


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the token cache hashes, in order."""
    seen: list[Path] = []
    original = token_cache.sha256_file

    def counting(path, *args, **kwargs):
        seen.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(token_cache, "sha256_file", counting)
    return seen


def test_a_cache_is_recorded_when_written_and_trusted_unread_while_untouched(
    small_corpus, tokenizer_dir, tmp_path, hashes
):
    first = blocks(small_corpus, tokenizer_dir, tmp_path)
    cache = only_cache(tmp_path)
    record = json.loads(token_cache.record_path(cache).read_text())
    assert record["file"] == cache.name and len(record["sha256"]) == 64
    assert hashes == [cache]  # hashed once, when written
    assert torch.equal(blocks(small_corpus, tokenizer_dir, tmp_path), first)
    assert hashes == [cache]  # read back unchanged: not hashed again


def test_changed_bytes_are_caught_and_the_cache_rebuilt_with_a_notice(
    small_corpus, tokenizer_dir, tmp_path, hashes, monkeypatch
):
    first = blocks(small_corpus, tokenizer_dir, tmp_path)
    cache = only_cache(tmp_path)
    data = bytearray(cache.read_bytes())
    ids = first[0, :4].tolist()  # the first tokens, stored one after another (int32 or int64)
    found = [data.find(b"".join(i.to_bytes(width, "little") for i in ids)) for width in (4, 8)]
    where = max(found)
    assert where > 0
    data[where] ^= 0x01  # the first token id becomes another
    stat = cache.stat()
    cache.write_bytes(bytes(data))
    os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and modification time
    with monkeypatch.context() as unchecked:  # trusted as datasets alone would: another token id
        unchecked.setattr(token_cache, "check", lambda path: True)
        assert not torch.equal(blocks(small_corpus, tokenizer_dir, tmp_path), first)
    with pytest.warns(UserWarning, match=rf"token cache {cache} differs from the checksum .*: rebuilding it"):
        again = blocks(small_corpus, tokenizer_dir, tmp_path)
    assert torch.equal(again, first)
    assert token_cache.check(cache)  # the rebuilt file is recorded anew


def test_a_touched_but_unchanged_cache_is_hashed_once_and_remembered(
    small_corpus, tokenizer_dir, tmp_path, hashes
):
    first = blocks(small_corpus, tokenizer_dir, tmp_path)
    cache = only_cache(tmp_path)
    os.utime(cache)  # a new state, the same bytes
    assert torch.equal(blocks(small_corpus, tokenizer_dir, tmp_path), first)
    assert torch.equal(blocks(small_corpus, tokenizer_dir, tmp_path), first)
    assert hashes == [cache, cache]  # when written, then once for the new state


def test_a_cache_without_a_record_is_rebuilt(small_corpus, tokenizer_dir, tmp_path):
    first = blocks(small_corpus, tokenizer_dir, tmp_path)
    cache = only_cache(tmp_path)
    token_cache.record_path(cache).unlink()
    with pytest.warns(UserWarning, match="has no recorded checksum"):
        assert torch.equal(blocks(small_corpus, tokenizer_dir, tmp_path), first)
    assert token_cache.record_path(cache).exists()


def test_a_truncated_chat_cache_is_rebuilt(tmp_path, cache_dir):
    from helpers import GPT2_TEMPLATE, THREE_TURNS, chat_tokenizer, write_jsonl

    chat_tokenizer("gpt2", tmp_path / "tokenizer")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": THREE_TURNS}] * 3)
    options = dict(val_files=str(path), tokenizer=str(tmp_path / "tokenizer"), chat_template=GPT2_TEMPLATE)
    first = TextDataModule(str(path), cache_dir=str(tmp_path / "cache"), **options)
    first.setup()
    cache = only_cache(tmp_path / "cache")
    cache.write_bytes(cache.read_bytes()[:-64])
    with pytest.warns(UserWarning, match="differs from the checksum"):
        again = TextDataModule(str(path), cache_dir=str(tmp_path / "cache"), **options)
        again.setup()
    assert torch.equal(again.datasets["train"].tokens, first.datasets["train"].tokens)
