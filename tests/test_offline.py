"""The offline proof: a whole CLI fit (W&B logging included) and an export with the network shut."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_records, run_file, tiny_recipe

GUARD = Path(__file__).parent / "offline_guard"  # sitecustomize.py: refuses and records outside connections
WANDB = '[{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "offline"}}]'


def _without_network() -> list[str]:
    """``unshare -n`` (a network namespace with no interfaces) where the kernel allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.mark.slow
def test_a_fit_and_an_export_run_with_sockets_blocked(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    attempts = tmp_path / "blocked.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(GUARD), str(Path(__file__).parent)]),
        "DISTILKIT_BLOCKED_LOG": str(attempts),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("WANDB_API_KEY", None)
    prefix = _without_network()
    probe = "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)"
    assert (
        subprocess.run([*prefix, sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0
    )
    assert "huggingface.co" in attempts.read_text(), "the guard records what it refuses"
    attempts.unlink()
    run_dir = tmp_path / "run"
    cli = [*prefix, sys.executable, "-m", "distilkit.cli"]
    fit = [*cli, "fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir)]
    for command in (
        [*fit, "--trainer.logger", WANDB],
        [
            *cli,
            "export",
            "--ckpt_path",
            str(run_dir / "checkpoints" / "last.ckpt"),
            "--output_dir",
            str(tmp_path / "s"),
        ],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not attempts.exists(), f"something tried the network: {attempts.read_text()}"
    assert (tmp_path / "s" / "config.json").is_file()
    assert any(r.HasField("history") for r in read_records(run_file(run_dir))), "W&B logged offline"
