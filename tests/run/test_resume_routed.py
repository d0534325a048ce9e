"""Exact resume of a run with several teachers routed by the data: an interrupted run, resumed from its last
checkpoint, ends with the uninterrupted run's student (and logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    TINY_TEACHER,
    csv_rows,
    kill_when_checkpointed,
    tiny_module,
    tiny_recipe,
    tiny_trainer,
    write_sourced_corpus,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from distilkit import TextDataModule

TEACHERS = {"prose": TINY_TEACHER, "code": TINY_TEACHER}


@pytest.fixture(scope="module")
def sourced(tmp_path_factory, corpus: Path) -> Path:
    return write_sourced_corpus(tmp_path_factory.mktemp("sourced") / "docs.jsonl", corpus)


def _fit(
    sourced: Path, tokenizer_dir: Path, cache_dir: Path, root: Path, steps: int, ckpt: str | None = None
):
    data = TextDataModule(
        str(sourced), tokenizer=str(tokenizer_dir), block_size=32, batch_size=4, cache_dir=str(cache_dir)
    )
    torch.manual_seed(0)  # the teachers are random: the same ones in both runs
    module = tiny_module(data, teacher=None, teachers=TEACHERS, route_by="source")
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(
        root, max_steps=steps, enable_checkpointing=True, limit_train_batches=3, val_check_interval=2,
        callbacks=[checkpoint],
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt)
    return module


def test_a_routed_run_resumes_to_the_same_weights(tmp_path, sourced, tokenizer_dir, cache_dir):
    straight = _fit(sourced, tokenizer_dir, cache_dir, tmp_path / "straight", 7)
    _fit(sourced, tokenizer_dir, cache_dir, tmp_path / "split", 4)  # mid-epoch (epochs of 3 batches)
    resumed = _fit(
        sourced, tokenizer_dir, cache_dir, tmp_path / "split", 7, str(tmp_path / "split" / "last.ckpt")
    )
    for (name, a), b in zip(
        straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True
    ):
        assert (a - b).abs().max() <= 1e-6, name
    checkpoint = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher_source.") for key in checkpoint["state_dict"]), "no teacher saved"


@pytest.mark.slow
def test_a_routed_run_killed_with_sigkill_resumes_exactly(tmp_path, sourced, tokenizer_dir, cache_dir):
    """A CLI fit of two routed teachers, SIGKILLed after step 5's checkpoint and resumed, ends with the
    uninterrupted run's weights and metrics.csv rows."""
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", sourced, tokenizer_dir, cache_dir, max_steps=12, val_check_interval=4
    )
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"] |= {"teacher": None, "teachers": TEACHERS, "route_by": "source"}
    recipe.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "distilkit.cli", "fit", "--config", str(recipe)]
    cli += ["--data.init_args.batch_size", "2", "--checkpoint.every_n_train_steps", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parents[1])}

    def run(run_dir: Path, *extra: str) -> None:
        command = [*cli, "--trainer.default_root_dir", str(run_dir), *extra]
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)

    run(tmp_path / "straight")
    slow = json.dumps(
        [{"class_path": "helpers.SlowSteps", "init_args": {"marker": str(tmp_path / "m"), "at_step": 0}}]
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*cli, "--trainer.default_root_dir", str(killed), "--trainer.callbacks", slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at = kill_when_checkpointed(process, killed / "checkpoints" / "last.ckpt", at_step=5)
    assert 5 <= killed_at < 12, "the run was not killed mid-training"
    run(killed, "--ckpt_path", "last")

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert b["global_step"] == 12
    assert max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]) <= 1e-6
    straight_rows, resumed_rows = csv_rows(tmp_path / "straight"), csv_rows(killed)
    assert [row[0] for row in resumed_rows] == [row[0] for row in straight_rows], "a step lost or repeated"
    for x, y in zip(straight_rows, resumed_rows, strict=True):
        for u, v in zip(x[1:], y[1:], strict=True):
            assert (u is None) == (v is None) and (u is None or abs(u - v) <= 1e-5 * max(1.0, abs(u)))
    header = (killed / "metrics.csv").read_text().splitlines()[0]
    assert "val/prose/ppl" in header and "val/code/ppl" in header
