"""Domains through packing: each token carries its document's domain (a row field, or the data file), and
nothing else about the data changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_jsonl

from distilkit import TextDataModule
from distilkit.data.text import PackedBlocks, held_out_split
from distilkit.errors import ConfigError


@pytest.fixture(scope="module")
def short_docs(corpus: Path) -> list[str]:
    """60 short documents (about 10 to 30 tokens): blocks of 32 tokens hold several of them."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    return [texts[i % len(texts)][(i * 7) % 300 :][: 40 + (i * 13) % 80] for i in range(60)]


def _data(files, tokenizer_dir: Path, cache_dir: Path, **kwargs) -> TextDataModule:
    data = TextDataModule(
        files, tokenizer=str(tokenizer_dir), block_size=32, batch_size=4, cache_dir=str(cache_dir), **kwargs
    )
    data.setup()
    return data


def _expected_domains(blocks: PackedBlocks, doc_domains: list[int]) -> torch.Tensor:
    """Each token's document's domain, from where the documents start in the stream (-1 at padding)."""
    positions = np.arange(blocks.tokens.numel())
    own = np.asarray(doc_domains)[blocks.document_of(positions)]
    return torch.from_numpy(np.where(blocks.valid.view(-1).numpy(), own, -1)).view_as(blocks.tokens)


def test_a_row_field_names_each_tokens_domain_through_packing(tmp_path, short_docs, tokenizer_dir, cache_dir):
    sources = ["prose" if i % 3 else "code" for i in range(len(short_docs))]
    rows = [{"text": t, "source": s} for t, s in zip(short_docs, sources, strict=True)]
    rows[7]["source"] = "5"
    del rows[8]["source"]  # a row without the field: domain None
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    data = _data(str(path), tokenizer_dir, cache_dir, domains="source", val_files=str(path))
    assert data.domain_field == "source" and data.domain_names == ["code", "prose", "5", None]
    blocks = data.datasets["val"]  # the whole file, in order
    assert isinstance(blocks, PackedBlocks) and blocks.domains is not None
    ids = {name: i for i, name in enumerate(data.domain_names)}
    names = [row.get("source") for row in rows]
    assert torch.equal(blocks.domains.long(), _expected_domains(blocks, [ids[n] for n in names]))
    # blocks of 32 hold several documents, so domains change inside blocks, right after an EOS
    eos = data.eos_token_id
    switches = (blocks.domains[:, 1:] != blocks.domains[:, :-1]) & blocks.valid[:, 1:]
    assert int(switches.sum()) > 20
    assert bool((blocks.tokens[:, :-1][switches] == eos).all()), "a document's EOS is its own"
    item = blocks[0]
    assert torch.equal(item["domain"], blocks.domains[0].long()) and item["domain"].dtype == torch.long
    assert data.document_domains is not None
    assert data.document_domains.row("5") == f"{path}:8" and data.document_domains.row(None) == f"{path}:9"
    tokens = data.document_domains.tokens(blocks)
    assert sum(tokens.values()) == int(blocks.valid.sum()) and set(tokens) == set(data.domain_names)


def test_the_data_file_names_each_tokens_domain(tmp_path, short_docs, tokenizer_dir, cache_dir):
    code = write_jsonl(tmp_path / "code.jsonl", [{"text": t} for t in short_docs[:25]])
    prose = tmp_path / "prose.txt"  # another format: one document per file, loaded by another builder
    prose.write_text(short_docs[30], encoding="utf-8")
    more = write_jsonl(tmp_path / "more_code.jsonl", [{"text": t} for t in short_docs[25:30]])
    data = _data(
        [str(prose), str(code), str(more)], tokenizer_dir, cache_dir, domains="file", val_fraction=0.2
    )
    assert sorted(n for n in data.domain_names if n) == ["code", "more_code", "prose"]
    # the documents in load order (by builder: the .txt first, then the two jsonl files), split as always
    loaded = ["prose"] + ["code"] * 25 + ["more_code"] * 5
    train, val = held_out_split(len(loaded), 0.2, 0)
    ids = {name: i for i, name in enumerate(data.domain_names)}
    for split, chosen in (("train", train), ("val", val)):
        blocks = data.datasets[split]
        assert isinstance(blocks, PackedBlocks) and blocks.domains is not None
        expected = _expected_domains(blocks, [ids[loaded[i]] for i in chosen])
        assert torch.equal(blocks.domains.long(), expected), split
    assert data.document_domains is not None and data.document_domains.row("more_code") == str(more)


def test_builtin_corpora_are_named_by_their_names_and_routes_change_nothing_else(tokenizer_dir, cache_dir):
    files = ["builtin:python-reference", "builtin:python-code"]
    plain = _data(files, tokenizer_dir, cache_dir)
    by_file = _data(files, tokenizer_dir, cache_dir, domains="file")
    by_source = _data(files, tokenizer_dir, cache_dir, domains="source")
    assert by_file.domain_names == by_source.domain_names == ["python-reference", "python-code"]
    assert plain.domain_field is None and "domain" not in plain.datasets["train"][0]
    for split in ("train", "val"):
        a, b, c = (d.datasets[split] for d in (plain, by_file, by_source))
        assert isinstance(a, PackedBlocks) and isinstance(b, PackedBlocks) and isinstance(c, PackedBlocks)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(b.domains, c.domains)  # type: ignore[arg-type]
    assert plain.identity() == by_file.identity() == by_source.identity()  # caches stay valid


def test_split_per_file_holds_out_what_each_file_alone_holds_out(
    tmp_path, short_docs, tokenizer_dir, cache_dir
):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in short_docs[:30]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in short_docs[30:]])
    both = _data([str(a), str(b)], tokenizer_dir, cache_dir, split_per_file=True, domains="file")
    val = both.datasets["val"]
    assert isinstance(val, PackedBlocks) and val.domains is not None
    for index, path in enumerate((a, b)):
        alone = _data(str(path), tokenizer_dir, cache_dir).datasets["val"]
        assert isinstance(alone, PackedBlocks)
        own = val.tokens[val.valid & (val.domains == both.domain_names.index(path.stem))]
        assert torch.equal(own, alone.tokens[alone.valid]), f"file {index}"
    whole = _data([str(a), str(b)], tokenizer_dir, cache_dir)
    assert both.identity() == {**whole.identity(), "split_per_file": True}


def test_bad_domain_settings_are_one_line_errors(tmp_path, short_docs, tokenizer_dir, cache_dir):
    rows = [{"text": t, "source": ["a", "b"]} for t in short_docs[:10]]
    path = write_jsonl(tmp_path / "lists.jsonl", rows)
    with pytest.raises(ConfigError, match=r"data.domains='source': holds .* not a name"):
        _data(str(path), tokenizer_dir, cache_dir, domains="source")
    with pytest.raises(ConfigError, match="data.domains=''"):
        _data(str(path), tokenizer_dir, cache_dir, domains="")
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": short_docs[0]}])
    more = write_jsonl(tmp_path / "more.jsonl", [{"text": t} for t in short_docs[:10]])
    with pytest.raises(ConfigError, match="data.split_per_file=.*one.jsonl.*one document"):
        _data([str(one), str(more)], tokenizer_dir, cache_dir, split_per_file=True)
