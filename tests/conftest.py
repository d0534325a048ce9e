"""Shared fixtures: a tokenizer and corpus made locally, tiny model configs, offline settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEACHER = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2}
TINY_STUDENT = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One distilkit cache for the session (tokenizers and token ids are reused between tests)."""
    path = tmp_path_factory.mktemp("distilkit-cache")
    os.environ["DISTILKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl corpus of 40 short documents from the built-in text."""
    from distilkit.corpus import _python_reference

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = _python_reference()[:40]
    path.write_text("".join(json.dumps({"text": d["text"][:1500]}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A 512-token byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer directory."""
    from distilkit.tokenizer import train_bpe

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe(texts, vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> Path:
    """A tiny CLI fit's last checkpoint (student GPT-2 1x32 distilled from a random 2x64 teacher)."""
    from test_cli import run_cli, tiny_recipe

    tmp = tmp_path_factory.mktemp("tiny-run")
    recipe = tiny_recipe(tmp / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp / "run"))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def datamodule(corpus: Path, tokenizer_dir: Path, cache_dir: Path):
    return make_datamodule(corpus, tokenizer_dir, cache_dir)


def make_datamodule(corpus: Path, tokenizer_dir: Path, cache_dir: Path):
    """A set-up TextDataModule over the test corpus: blocks of 32 tokens, batches of 4."""
    from distilkit import TextDataModule

    dm = TextDataModule(
        str(corpus),
        tokenizer=str(tokenizer_dir),
        block_size=32,
        batch_size=4,
        val_fraction=0.1,
        cache_dir=str(cache_dir),
    )
    dm.setup()
    return dm


def tiny_module(datamodule, teacher=TINY_TEACHER, student=TINY_STUDENT, cls=None, **kwargs):
    """A DistillationModule (or subclass ``cls``) of tiny GPT-2s sized from the data module's tokenizer."""
    from distilkit import DistillationModule

    return (cls or DistillationModule)(
        student=student,
        teacher=teacher,
        vocab_size=datamodule.vocab_size,
        block_size=datamodule.block_size,
        eos_token_id=datamodule.eos_token_id,
        **kwargs,
    )


def tiny_trainer(tmp_path: Path, max_steps: int = 4, **kwargs):
    import lightning as L

    options = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return L.Trainer(**options)
