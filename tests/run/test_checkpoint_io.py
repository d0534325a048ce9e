"""Checkpoint writes are atomic: a failure mid-write leaves the previous checkpoint whole; and sealed: a
checkpoint whose contents changed after it was written is refused wherever distilkit reads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import fit_run, flip_tensor_byte, resume_run, run_cli, tiny_recipe

from distilkit.data.verified import shared_memo
from distilkit.models.checkpoint import SEAL, read_checkpoint
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


def test_a_checkpoint_changed_after_it_was_written_is_refused_wherever_it_is_read(
    tmp_path, tiny_run, corpus, tokenizer_dir, cache_dir, capsys, monkeypatch
):
    """Issue 21.1: torch.load reads a checkpoint whose tensor bytes changed (it checks no CRC) and training
    went on from garbage; the seal written in every checkpoint refuses it in one line, naming the file and
    the checkpoints beside it."""
    monkeypatch.setenv("COLUMNS", "1000")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.parent.parent, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    sealed = torch.load(last, weights_only=True)
    assert set(sealed[SEAL]) == {"sha256", "scheme"}
    assert shared_memo().lookup(tiny_run) == sealed[SEAL]["sha256"], "remembered when written"
    flip_tensor_byte(last)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    for command in (
        ["export", "--ckpt_path", str(last), "--output_dir", str(tmp_path / "student")],
        ["fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last"],
        ["evaluate", "--models", f"[{last}]", "--data_files", str(corpus), "--progress", "false"],
        ["generate", "--model", str(last), "--output_file", str(tmp_path / "samples.jsonl")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*command)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"{last}': has other contents than were written" in err, err
    assert not (tmp_path / "student").exists() and not (tmp_path / "samples.jsonl").exists()


def test_a_checkpoint_read_again_unchanged_is_not_hashed_again_and_one_without_a_seal_is_read(
    tiny_run, monkeypatch
):
    read_checkpoint(tiny_run)  # remembered (here, or when written)
    monkeypatch.setattr("distilkit.models.checkpoint.content_digest", lambda value: pytest.fail("hashed"))
    read_checkpoint(tiny_run)
    monkeypatch.undo()
    old = Path(__file__).parents[1] / "fixtures" / "layout_v0" / "last.ckpt"
    assert SEAL not in torch.load(old, weights_only=True)
    assert read_checkpoint(old)["global_step"] > 0


def test_an_exported_model_is_checked_when_distilkit_reads_it_back(tmp_path, tiny_run, capsys, monkeypatch):
    """Issue 21.1: export and prune write a manifest of hashes; a model directory changed since is refused
    (as a student, a teacher, evaluate's or generate's model) in one line naming the file and the command
    that writes it again. Files added beside (a README) are fine."""
    from distilkit.models.loading import load_causal_lm

    monkeypatch.setenv("COLUMNS", "1000")
    out = tmp_path / "student"
    run_cli("export", "--ckpt_path", str(tiny_run), "--output_dir", str(out))
    manifest = json.loads((out / "distilkit-manifest.json").read_text())
    assert (
        manifest["command"] == f"distilkit export --ckpt_path {tiny_run} --output_dir {out} --dtype float32"
    )
    (out / "README.md").write_text("notes")
    load_causal_lm(str(out), field="model.student")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("generate", "--model", str(out), "--output_file", str(tmp_path / "s.jsonl"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"the model directory's {weights} does not match the SHA-256 written with it" in err
    assert f"write it again ({manifest['command']})" in err


def test_a_trained_tokenizer_is_checked_when_read_back(tmp_path, corpus):
    from distilkit.data import TextDataModule
    from distilkit.errors import ConfigError

    settings = {"vocab_size": 300}
    TextDataModule(str(corpus), tokenizer=settings, cache_dir=str(tmp_path))
    trained = next(tmp_path.glob("tokenizer-*"))
    assert (trained / "distilkit-manifest.json").is_file()
    TextDataModule(str(corpus), tokenizer=settings, cache_dir=str(tmp_path))  # read back: checked, fine
    (trained / "tokenizer.json").write_text((trained / "tokenizer.json").read_text().replace('"Ġ', '"Ä', 1))
    with pytest.raises(
        ConfigError, match=rf"its trained tokenizer's {trained}/tokenizer.json .*rm -r {trained}"
    ):
        TextDataModule(str(corpus), tokenizer=settings, cache_dir=str(tmp_path))
