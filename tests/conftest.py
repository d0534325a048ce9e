"""Shared fixtures: a tokenizer and corpus made locally, tiny model configs, offline settings."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One distilkit cache for the session (tokenizers and token ids are reused between tests)."""
    path = tmp_path_factory.mktemp("distilkit-cache")
    os.environ["DISTILKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl corpus of 40 short documents from the built-in text."""
    from distilkit.data.corpus import _python_reference

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = _python_reference()[:40]
    path.write_text("".join(json.dumps({"text": d["text"][:1500]}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The first 8 documents of the corpus, cut to 700 characters: about 60 blocks of 32 tokens."""
    path = tmp_path_factory.mktemp("small-corpus") / "docs.jsonl"
    lines = corpus.read_text().splitlines()[:8]
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"][:700]}) + "\n" for line in lines))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A 512-token byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer directory."""
    from distilkit.data.tokenizer import train_bpe

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe(texts, vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> Path:
    """A tiny CLI fit's last checkpoint (student GPT-2 1x32 distilled from a random 2x64 teacher)."""
    from helpers import run_cli, tiny_recipe

    tmp = tmp_path_factory.mktemp("tiny-run")
    recipe = tiny_recipe(tmp / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp / "run"))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def datamodule(corpus: Path, tokenizer_dir: Path, cache_dir: Path):
    from helpers import make_datamodule

    return make_datamodule(corpus, tokenizer_dir, cache_dir)


@pytest.fixture
def lightning_log(caplog):
    """``caplog`` that also sees Lightning's ``rank_zero_info`` lines: Lightning's logger stops propagating
    to the root logger when it is imported before the root logger has a handler (then caplog sees nothing)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # restored after the test
    yield caplog
    logger.removeHandler(caplog.handler)
