"""Checkpoint writes are atomic: a failure mid-write leaves the previous checkpoint whole."""

from __future__ import annotations

import pytest
import torch
from helpers import fit_run, resume_run, tiny_recipe

from distilkit.run.checkpoint_io import AtomicCheckpointIO


def test_a_failure_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("distilkit.run.checkpoint_io.torch.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "a temporary file was left behind"


def test_the_cli_writes_checkpoints_atomically_and_resume_ignores_leftovers(
    tmp_path, corpus, tokenizer_dir, cache_dir, monkeypatch
):
    written = []
    original = AtomicCheckpointIO.save_checkpoint

    def counting(self, checkpoint, path, storage_options=None):
        written.append(str(path))
        original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counting)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    assert any(p.endswith("last.ckpt") for p in written), "the CLI did not write through AtomicCheckpointIO"
    # a write killed halfway leaves a temporary file; `--ckpt_path last` must not take it
    (run_dir / "checkpoints" / ".last.ckpt.x1y2.tmp").write_bytes(b"partial")
    resume_run(recipe, run_dir, 6)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
