"""The FSDP recipe on GPUs (``gpu`` marker): runs wherever two CUDA devices are present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilkit.models.checkpoint import load_model_and_tokenizer

ROOT = Path(__file__).parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def test_the_fsdp_recipe_shards_student_and_teacher_and_writes_an_exportable_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "distilkit.cli",
        "fit",
        "--config",
        str(ROOT / "recipes" / "quickstart.yaml"),
    ]
    command += ["--config", str(ROOT / "recipes" / "fsdp.yaml"), "--trainer.default_root_dir", str(run_dir)]
    command += [
        "--trainer.max_steps",
        "20",
        "--model.init_args.lr_scheduler.init_args.total_steps",
        "20",
        "--trainer.val_check_interval",
        "10",
        "--trainer.limit_val_batches",
        "4",
    ]
    command += ["--data.init_args.cache_dir", str(cache_dir)]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "FSDP2 shards 2 and 4 blocks (student, teacher) over 2 processes" in output
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 20
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    student, tokenizer = load_model_and_tokenizer(run_dir / "checkpoints" / "last.ckpt")
    assert tokenizer is not None and sum(p.numel() for p in student.parameters()) > 0
