"""TextDataModule: file formats, tokenizer training, caching, packing and splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distilkit import TextDataModule
from distilkit.data import PackedBlocks
from distilkit.errors import ConfigError


def test_packing_joins_documents_with_eos_and_pads_only_the_last_block():
    stream = np.arange(1, 11)  # 10 tokens
    blocks = PackedBlocks(stream, block_size=4, pad_id=0)
    assert len(blocks) == 3
    first, last = blocks[0], blocks[2]
    assert first["input_ids"].tolist() == [1, 2, 3, 4]
    assert first["labels"].tolist() == [1, 2, 3, 4] and first["attention_mask"].tolist() == [1, 1, 1, 1]
    assert last["input_ids"].tolist() == [9, 10, 0, 0]
    assert last["labels"].tolist() == [9, 10, -100, -100]
    assert last["attention_mask"].tolist() == [1, 1, 0, 0]


def test_batches_follow_the_hugging_face_causal_lm_convention(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "block_index"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    blocks = datamodule.datasets["train"]
    assert batch["block_index"].shape == (4,), "each example names its block (a teacher cache reads by it)"
    for row, index in enumerate(batch["block_index"].tolist()):
        assert torch.equal(blocks[index]["input_ids"], batch["input_ids"][row])
    valid = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][valid], batch["input_ids"][valid])


def test_documents_are_separated_by_eos(datamodule):
    ids = datamodule.datasets["train"].tokens.flatten()
    eos_count = int((ids == datamodule.eos_token_id).sum())
    assert eos_count >= 30  # ~36 training documents, each ended by EOS


def test_split_is_deterministic_and_disjoint(corpus, tokenizer_dir, cache_dir):
    def make(seed):
        dm = TextDataModule(
            str(corpus),
            tokenizer=str(tokenizer_dir),
            block_size=32,
            val_fraction=0.1,
            cache_dir=str(cache_dir),
            seed=seed,
        )
        dm.setup()
        return dm.datasets["train"].tokens, dm.datasets["val"].tokens

    train_a, val_a = make(0)
    train_b, val_b = make(0)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    _, val_c = make(1)
    assert not torch.equal(val_a, val_c)
    n_train, n_val = train_a.numel(), val_a.numel()
    assert 0 < n_val < n_train


def test_val_files_are_used_as_given(corpus, tokenizer_dir, cache_dir, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("A held out document about the for statement.\n" * 20)
    dm = TextDataModule(
        str(corpus), val_files=str(val), tokenizer=str(tokenizer_dir), block_size=16, cache_dir=str(cache_dir)
    )
    dm.setup()
    decoded = dm.tokenizer.decode(dm.datasets["val"].tokens.flatten()[:30])
    assert decoded.startswith("A held out document")


def test_txt_jsonl_and_parquet_read_alike(tmp_path, tokenizer_dir, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document number {i} talks about loops and functions." for i in range(12)]
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
    streams = []
    for files, field in [
        (sorted(str(p) for p in (tmp_path / "txt").iterdir()), "text"),
        (str(tmp_path / "docs.jsonl"), "body"),
        (str(tmp_path / "docs.parquet"), "body"),
    ]:
        dm = TextDataModule(
            files,
            text_field=field,
            tokenizer=str(tokenizer_dir),
            block_size=8,
            val_fraction=0.25,
            cache_dir=str(cache_dir),
        )
        dm.setup()
        streams.append(
            torch.cat([dm.datasets["train"].tokens.flatten(), dm.datasets["val"].tokens.flatten()])
        )
    assert torch.equal(streams[0], streams[1]) and torch.equal(streams[1], streams[2])


def test_a_single_document_is_split_at_its_tail(tmp_path, tokenizer_dir, cache_dir):
    path = tmp_path / "one.txt"
    path.write_text("The while statement repeats a block. " * 200)
    dm = TextDataModule(
        str(path), tokenizer=str(tokenizer_dir), block_size=16, val_fraction=0.1, cache_dir=str(cache_dir)
    )
    dm.setup()
    assert len(dm.datasets["val"]) >= 1 and len(dm.datasets["train"]) > len(dm.datasets["val"])


def test_a_tokenizer_is_trained_cached_and_reused(corpus, cache_dir):
    dm = TextDataModule(str(corpus), tokenizer={"vocab_size": 400}, cache_dir=str(cache_dir))
    assert dm.vocab_size == 400
    assert dm.tokenizer.decode(dm.tokenizer.encode("def f(x): return x")) == "def f(x): return x"
    trained = sorted(cache_dir.glob("tokenizer-*"))
    again = TextDataModule(str(corpus), tokenizer={"vocab_size": 400}, cache_dir=str(cache_dir))
    assert sorted(cache_dir.glob("tokenizer-*")) == trained
    assert again.tokenizer.get_vocab() == dm.tokenizer.get_vocab()


def test_token_ids_are_cached_on_disk(corpus, tokenizer_dir, tmp_path):
    cache = tmp_path / "cache"
    TextDataModule(str(corpus), tokenizer=str(tokenizer_dir), cache_dir=str(cache)).setup()
    cached = list(cache.glob("tokens-*.arrow"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    TextDataModule(str(corpus), tokenizer=str(tokenizer_dir), cache_dir=str(cache)).setup()
    assert cached[0].stat().st_mtime_ns == stamp


def test_the_builtin_corpus_needs_no_network(tokenizer_dir, cache_dir):
    dm = TextDataModule(
        "builtin:python-reference", tokenizer=str(tokenizer_dir), block_size=64, cache_dir=str(cache_dir)
    )
    dm.setup()
    assert len(dm.datasets["train"]) * 64 > 100_000


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"train_files": "missing.jsonl"}, r"data.train_files='missing.jsonl': does not exist"),
        ({"train_files": []}, r"data.train_files=\[\]: is empty"),
        ({"train_files": "builtin:nothing"}, r"is not a built-in corpus"),
        ({"block_size": 1}, r"data.block_size=1"),
        ({"val_fraction": 1.5}, r"data.val_fraction=1.5"),
        ({"tokenizer": {"vocab_sise": 300}}, r"data.tokenizer.vocab_sise"),
        ({"tokenizer": "no/such/tokenizer"}, r"data.tokenizer='no/such/tokenizer': is not a directory"),
    ],
)
def test_bad_settings_name_the_field(kwargs, match, corpus, cache_dir):
    options = {"train_files": str(corpus), "cache_dir": str(cache_dir), **kwargs}
    with pytest.raises(ConfigError, match=match):
        TextDataModule(**options)


def test_an_empty_dataset_is_a_clear_error(tmp_path, tokenizer_dir, cache_dir):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n")
    dm = TextDataModule(str(path), tokenizer=str(tokenizer_dir), cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match="holds no text"):
        dm.setup()


def test_a_missing_text_field_is_a_clear_error(corpus, tokenizer_dir, cache_dir):
    dm = TextDataModule(
        str(corpus), text_field="body", tokenizer=str(tokenizer_dir), cache_dir=str(cache_dir)
    )
    with pytest.raises(ConfigError, match=r"data.text_field='body'.*use one of \['text'\]"):
        dm.setup()


def test_an_unreadable_file_is_a_clear_error(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    # CI runs as root, which reads any file: make the permission check see what a user would.
    monkeypatch.setattr("distilkit.data.sources.os.access", lambda p, mode: Path(p) != path)
    with pytest.raises(ConfigError, match="is not readable"):
        TextDataModule(str(path), cache_dir=str(cache_dir))


@pytest.mark.parametrize(
    "name,content", [("bad.txt", b"hello \xff\xfe world"), ("bad.jsonl", b'{"text": "ok \xff"}\n')]
)
def test_bytes_that_are_not_utf8_are_refused_with_their_offset(tmp_path, cache_dir, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"is not valid UTF-8 \(invalid start byte at byte \d+\)"):
        TextDataModule(str(path), cache_dir=str(cache_dir))


# ---------------------------------------------------------------- issue 11: data that trains on nonsense
@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"text": "fine"}, {"text": 5}], r"docs.jsonl:2.*has int values in 'text', not text"),
        ([{"text": [1, 2]}], r"docs.jsonl:1.*has list values in 'text'"),
        (
            [{"text": "fine"}, {"other": 1}, {"text": None}],
            r"2 rows.*have no 'text' \(the first at .*docs.jsonl:2\)",
        ),
    ],
)
def test_rows_without_text_are_named_by_line(rows, match, tmp_path, tokenizer_dir, cache_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = TextDataModule(str(path), tokenizer=str(tokenizer_dir), block_size=4, cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match=match):
        dm.setup()


def test_rows_without_text_are_skipped_only_when_asked(tmp_path, tokenizer_dir, cache_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps(row) + "\n" for row in [{"text": "a b c d e f g h " * 8}, {"x": 1}] * 3)
    )
    dm = TextDataModule(
        str(path),
        tokenizer=str(tokenizer_dir),
        block_size=4,
        cache_dir=str(cache_dir),
        skip_missing_text=True,
    )
    with pytest.warns(UserWarning, match="skipped 3 rows without 'text'"):
        dm.setup()
    assert len(dm.datasets["train"]) > 0


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
def test_an_empty_or_blank_file_holds_no_text(name, content, tmp_path, cache_dir):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"holds no text \(it is empty or blank\)"):
        TextDataModule(str(path), cache_dir=str(cache_dir))


def test_batch_size_1_is_a_valid_size(corpus, tokenizer_dir, cache_dir):
    dm = TextDataModule(
        str(corpus), tokenizer=str(tokenizer_dir), block_size=32, batch_size=1, cache_dir=str(cache_dir)
    )
    dm.setup()
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (1, 32)


def test_caches_are_keyed_by_content_not_by_path_size_or_time(tmp_path, tokenizer_dir, cache_dir):
    """A file rewritten with text of the same size and the same modification time is read anew."""
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "aaaa " * 40}) + "\n")
    stamp = path.stat().st_mtime_ns

    def first_tokens() -> list[int]:
        dm = TextDataModule(
            str(path),
            val_files=str(path),
            tokenizer=str(tokenizer_dir),
            block_size=8,
            cache_dir=str(cache_dir),
        )
        dm.setup()
        return dm.datasets["train"].tokens[0].tolist()

    before = first_tokens()
    path.write_text(json.dumps({"text": "bbbb " * 40}) + "\n")  # same size
    os.utime(path, ns=(stamp, stamp))  # same modification time
    assert first_tokens() != before


def test_test_files_give_test_its_own_split_and_without_them_it_says_so(
    corpus, tokenizer_dir, cache_dir, tmp_path
):
    held = tmp_path / "test.txt"
    held.write_text("A test document about classes. " * 20)
    dm = TextDataModule(
        str(corpus),
        test_files=str(held),
        tokenizer=str(tokenizer_dir),
        block_size=16,
        cache_dir=str(cache_dir),
    )
    dm.setup("test")
    assert dm.tokenizer.decode(dm.datasets["test"].tokens.flatten()[:12]).startswith("A test document")
    plain = TextDataModule(str(corpus), tokenizer=str(tokenizer_dir), block_size=16, cache_dir=str(cache_dir))
    plain.setup("test")
    with pytest.warns(UserWarning, match="test_files is not set: `test` scores the validation split"):
        plain.test_dataloader()
