"""Two CPU processes under DDP or FSDP2 (gloo) train exactly as one process with the same global batch,
and resume exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY_STUDENT, TINY_TEACHER, csv_rows, tiny_recipe

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # dropout masks differ per process


def _fit(recipe, run_dir, *overrides: str) -> str:
    command = [sys.executable, "-m", "distilkit.cli", "fit", "--config", str(recipe)]
    command += ["--trainer.default_root_dir", str(run_dir), *overrides]
    result = subprocess.run(command, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


FSDP = [  # FSDP2 over two CPU processes (gloo): the blocks of student and teacher are sharded
    "--trainer.strategy",
    "ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size",
    "2",
    "--trainer.strategy.tensor_parallel_size",
    "1",
    "--trainer.strategy.save_distributed_checkpoint",
    "false",
]
DDP = ["--trainer.strategy", "ddp"]  # find_unused_parameters off: an unused parameter would be an error


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [DDP, FSDP], ids=["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, corpus, tokenizer_dir, cache_dir, strategy
):
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=6, val_check_interval=3
    )
    models = [
        "--trainer.gradient_clip_val",  # clipping across shards and whole gradients must match one process
        "0.5",
        "--model.init_args.student",
        str({**TINY_STUDENT, **NO_DROPOUT}),
        "--model.init_args.teacher",
        str({**TINY_TEACHER, **NO_DROPOUT}),
    ]
    _fit(recipe, tmp_path / "one", *models, "--data.init_args.batch_size", "4", "--trainer.max_steps", "9")
    two = [
        *models,
        "--data.init_args.batch_size",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
    ]
    output = _fit(recipe, tmp_path / "two", *two, *strategy)
    # stopped at step 6 (mid-epoch), resumed to 9: the distributed resume is exact too
    _fit(recipe, tmp_path / "two", *two, *strategy, "--ckpt_path", "last", "--trainer.max_steps", "9")
    assert "Starting with 2 processes" in output and "gloo" in output
    if strategy is FSDP:
        assert "FSDP2 shards 1 and 2 blocks (student, teacher) over 2 processes" in output

    one, two = csv_rows(tmp_path / "one"), csv_rows(tmp_path / "two")
    train = lambda rows: [(step, loss) for step, loss, _ in rows if loss is not None]  # noqa: E731
    assert [step for step, _ in train(two)] == [step for step, _ in train(one)] == list(range(9))
    losses_one, losses_two = (torch.tensor([loss for _, loss in train(rows)]) for rows in (one, two))
    torch.testing.assert_close(losses_two, losses_one, rtol=1e-5, atol=0)
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    assert not any(key.startswith("teacher.") for key in b["state_dict"]), "the teacher stays frozen and out"
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_one_line_error_under_ddp_is_printed_once(tmp_path, corpus, tokenizer_dir, cache_dir):
    """Every process refuses a batch size the data cannot fill; the user reads the line once."""
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=2)
    command = [sys.executable, "-m", "distilkit.cli", "fit", "--config", str(recipe)]
    command += ["--trainer.default_root_dir", str(tmp_path / "run"), *DDP, "--trainer.accelerator", "cpu"]
    command += ["--trainer.devices", "2", "--data.init_args.batch_size", "1000"]
    result = subprocess.run(command, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("data.batch_size=1000: needs 2000 training blocks") == 1, result.stderr[-3000:]
