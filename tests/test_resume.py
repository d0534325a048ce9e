"""Exact resume: an interrupted run, resumed from its last checkpoint, ends with the same student."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_datamodule, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_cli import tiny_recipe

from distilkit.sampling import ResumableBatchSampler


class BatchLog(Callback):
    def __init__(self) -> None:
        self.first_ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first_ids.append(int(batch["input_ids"][0, 0]))


def test_the_sampler_resumes_mid_epoch_and_at_an_epoch_end():
    straight = ResumableBatchSampler(10, 3, seed=7)
    epochs = [list(straight) for _ in range(3)]
    resumed = ResumableBatchSampler(10, 3, seed=7)
    resumed.resume_at(1, 2)
    assert list(resumed) == epochs[1][2:] and list(resumed) == epochs[2]
    at_end = ResumableBatchSampler(10, 3, seed=7)
    at_end.resume_at(0, 3)
    assert list(at_end) == epochs[1]


def _fit(datamodule, root: Path, max_steps: int, ckpt_path: str | None = None):
    torch.manual_seed(0)
    module = tiny_module(datamodule)  # dropout on: the random state must come back too
    log = BatchLog()
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(
        root,
        max_steps=max_steps,
        enable_checkpointing=True,
        limit_train_batches=3,
        val_check_interval=2,
        callbacks=[checkpoint, log],
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, log


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch (epochs of 3 batches) and at an epoch's end
def test_resume_ends_with_the_same_weights_and_batches(tmp_path, corpus, tokenizer_dir, cache_dir, stop_at):
    straight, straight_log = _fit(make_datamodule(corpus, tokenizer_dir, cache_dir), tmp_path / "straight", 8)
    _fit(make_datamodule(corpus, tokenizer_dir, cache_dir), tmp_path / "split", stop_at)
    resumed, resumed_log = _fit(
        make_datamodule(corpus, tokenizer_dir, cache_dir),
        tmp_path / "split",
        8,
        ckpt_path=str(tmp_path / "split" / "last.ckpt"),
    )
    assert resumed_log.first_ids == straight_log.first_ids[stop_at:], "a batch was repeated or skipped"
    for (name, a), b in zip(
        straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True
    ):
        assert (a - b).abs().max() <= 1e-6, name


def _cli(recipe: Path, *overrides: str) -> list[str]:
    """`distilkit fit` in a subprocess: 12 steps of batch 2, long enough to interrupt."""
    return [
        sys.executable,
        "-m",
        "distilkit.cli",
        "fit",
        "--config",
        str(recipe),
        "--data.init_args.batch_size",
        "2",
        *overrides,
    ]


def _run(command: list[str], run_dir: Path, env: dict[str, str], *extra: str) -> None:
    subprocess.run(
        [*command, "--trainer.default_root_dir", str(run_dir), *extra],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )


def _assert_same_student(straight_dir: Path, resumed_dir: Path, steps: int) -> None:
    """The resumed run reached ``steps`` with the uninterrupted run's weights (max abs difference ≤ 1e-6)."""
    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert b["global_step"] == steps
    assert max(float((a[k] - b["state_dict"][k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=12, val_check_interval=4
    )
    cli = _cli(recipe, "--checkpoint.every_n_train_steps", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    _run(cli, tmp_path / "straight", env)

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [*cli, "--trainer.default_root_dir", str(killed_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 5 <= killed_at < 12, "the run was not killed mid-training"

    _run(cli, killed_dir, env, "--ckpt_path", "last")
    _assert_same_student(tmp_path / "straight", killed_dir, 12)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=12, val_check_interval=4
    )
    cli = _cli(recipe)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    _run(cli, tmp_path / "straight", env)

    marker = tmp_path / "reached"
    slow = f'[{{"class_path": "slow_steps.SlowSteps", "init_args": {{"marker": "{marker}", "at_step": 5}}}}]'
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen(
        [*cli, "--trainer.default_root_dir", str(run_dir), "--trainer.callbacks", slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 5 <= stopped_at < 12

    _run(cli, run_dir, env, "--ckpt_path", "last")
    _assert_same_student(tmp_path / "straight", run_dir, 12)
