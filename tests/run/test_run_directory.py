"""A run's directory is never left half-made or silently reused: failed starts are undone, `last` must
exist, Ctrl-C and running out of memory keep the last good checkpoint (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    csv_rows,
    fit_run,
    resume_run,
    run_cli,
    signal_at_marker,
    tiny_model_dir,
    tiny_recipe,
)
from transformers import AutoTokenizer

from distilkit.data.tokenizer import train_bpe


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _exit_code(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    return exit_info.value.code, " ".join(capsys.readouterr().err.split())


def test_a_teacher_with_another_vocabulary_of_the_same_size_is_refused_and_nothing_is_left(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    """Issue 11.1: the sizes match (512), the tokens do not."""
    texts = [line[::-1] for line in corpus.read_text().splitlines()]  # the same text backwards
    other = train_bpe([json.loads(t[::-1])["text"][::-1] for t in texts], vocab_size=512, show_progress=False)
    teacher = tiny_model_dir(tmp_path / "teacher", other)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    code, err = _exit_code(
        capsys,
        "fit",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--model.init_args.teacher",
        str(teacher),
    )
    assert code == 2 and "Traceback" not in err
    assert "data.tokenizer" in err and "model.teacher" in err and "first differences:" in err
    assert not (tmp_path / "run").exists(), "a failed start left files behind"


def test_a_teacher_directory_without_a_tokenizer_is_said_once_and_the_run_goes_on(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    teacher = tiny_model_dir(tmp_path / "teacher", None)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=1)
    with pytest.warns(UserWarning, match="has no tokenizer files: its vocabulary is checked by size only"):
        fit_run(recipe, tmp_path / "run", "--model.init_args.teacher", str(teacher))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_resuming_with_another_student_is_refused_and_leaves_the_run_as_it_was(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=2)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    before = _files(run_dir)
    bigger = '{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}'
    code, err = _exit_code(
        capsys,
        "fit",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(run_dir),
        "--model.init_args.student",
        bigger,
        "--ckpt_path",
        "last",
    )
    assert code == 2 and "holds a student of another architecture" in err and "n_layer: 1 vs 2" in err
    assert _files(run_dir) == before, "the failed resume changed or added files (config.resumed-1.yaml?)"


def test_last_or_new_starts_a_new_run_where_nothing_was_checkpointed(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text(
        "step,train/loss\n0,9.0\n1,8.0\n"
    )  # an attempt killed before a checkpoint
    fit_run(recipe, run_dir, "--ckpt_path", "last_or_new")
    steps = [row[0] for row in csv_rows(run_dir) if row[1] is not None]
    assert steps == [0, 1], "rows of the abandoned attempt were kept or repeated"
    resume_run(recipe, run_dir, 3)  # and `last` now finds the new run's checkpoint
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("place", ["truncated", "text"])
def test_an_unreadable_checkpoint_is_one_line_for_fit_export_and_evaluate(
    place, tmp_path, tiny_run, corpus, tokenizer_dir, cache_dir, capsys
):
    broken = tmp_path / "broken.ckpt"
    data = tiny_run.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if place == "truncated" else b"not a checkpoint")
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    for command in (
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--ckpt_path",
            str(broken),
        ],
        ["export", "--ckpt_path", str(broken), "--output_dir", str(tmp_path / "out")],
        ["evaluate", "--models", f"[{broken}]", "--data_files", str(corpus)],
    ):
        code, err = _exit_code(capsys, *command)
        assert code == 2 and "could not be read as a checkpoint" in err and "Traceback" not in err, command
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_running_out_of_memory_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=6)
    oom = '[{"class_path": "helpers.OutOfMemoryAt", "init_args": {"at_step": 3}}]'
    code, err = _exit_code(
        capsys,
        "fit",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.callbacks",
        oom,
    )
    assert code == 1 and "Traceback" not in err
    assert "out of memory at step 3; lower one of data.batch_size=4, data.block_size=32" in err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(last) in err and torch.load(last, weights_only=True)["global_step"] == 2


def test_checkpoints_and_exports_get_the_permissions_a_plain_file_would(tmp_path, tiny_run):
    mask = os.umask(0o022)
    try:
        run_cli("export", "--ckpt_path", str(tiny_run), "--output_dir", str(tmp_path / "student"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "student").stat().st_mode) == 0o755
    assert stat.S_IMODE(tiny_run.stat().st_mode) == 0o644
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in (tmp_path / "student").iterdir())


@pytest.mark.slow  # a fit in a subprocess (~45 s); runs in CI (`make test`)
def test_a_hub_name_in_the_local_cache_loads_offline(tmp_path, tokenizer_dir):
    """Issue 11.12: ``org/name`` resolves from the Hugging Face cache with HF_HUB_OFFLINE=1."""
    snapshot = tmp_path / "hub" / "models--distilkit--tiny" / "snapshots" / ("0" * 40)
    tiny_model_dir(snapshot, AutoTokenizer.from_pretrained(tokenizer_dir))
    (tmp_path / "hub" / "models--distilkit--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--distilkit--tiny" / "refs" / "main").write_text("0" * 40)
    code = (
        "from distilkit.models.loading import load_causal_lm as f; print(type(f('{}', field='m')).__name__)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run(
        [sys.executable, "-c", code.format("distilkit/tiny")], env=env, capture_output=True, text=True
    )
    assert found.returncode == 0 and "GPT2LMHeadModel" in found.stdout, found.stderr[-2000:]
    elsewhere = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    missing = subprocess.run(  # run where no distilkit/ directory makes the name look like a local path
        [sys.executable, "-c", code.format("distilkit/absent")],
        env=elsewhere,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "is neither a directory nor in the local Hugging Face cache" in missing.stderr
    local = subprocess.run(  # issue 21.5: from the repository root, distilkit/ is a directory: said at once
        [sys.executable, "-c", code.format("distilkit/absent")], env=env, capture_output=True, text=True
    )
    assert "m='distilkit/absent': does not exist" in local.stderr


@pytest.mark.slow
def test_ctrl_c_writes_last_ckpt_exits_130_and_resumes_without_repeated_rows(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=10, val_check_interval=5
    )
    cli = [
        sys.executable,
        "-m",
        "distilkit",
        "fit",
        "--config",
        str(recipe),
        "--data.init_args.batch_size",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # tests/: helpers.SlowSteps
    subprocess.run(
        [*cli, "--trainer.default_root_dir", str(tmp_path / "straight")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    marker, run_dir = tmp_path / "reached", tmp_path / "stopped"
    slow = f'[{{"class_path": "helpers.SlowSteps", "init_args": {{"marker": "{marker}", "at_step": 3}}}}]'
    process = subprocess.Popen(
        [*cli, "--trainer.default_root_dir", str(run_dir), "--trainer.callbacks", slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    returncode, err = signal_at_marker(process, marker, signal.SIGINT)
    assert returncode == 130, err[-2000:]
    assert "Ctrl-C" in err and "resume with --ckpt_path last" in err
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 10
    subprocess.run(
        [*cli, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10
    assert max(float((straight[k] - resumed["state_dict"][k]).abs().max()) for k in straight) <= 1e-6
    assert [r[0] for r in csv_rows(run_dir)] == [r[0] for r in csv_rows(tmp_path / "straight")], (
        "rows repeated or lost"
    )


def test_a_fit_checkpoints_its_final_step_between_validations(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=3, val_check_interval=2
    )
    fit_run(recipe, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
