"""`distilkit cache`: the recipe's teacher run once over its blocks, targets stored; an interrupted run
resumes; several processes make the same cache as one; training from the cache refuses every mismatch."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY_STUDENT,
    TINY_TEACHER,
    kill_when_checkpointed,
    run_cli,
    signal_at_marker,
    tiny_recipe,
)
from transformers import GPT2Config, GPT2LMHeadModel

from distilkit.data.teacher_cache import TeacherCache
from distilkit.errors import ConfigError
from distilkit.teachers import model_identity

QUIET = ("--trainer.enable_progress_bar", "false")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, small_corpus, tokenizer_dir, cache_dir) -> Path:
    """The tiny recipe (random 2x64 teacher, forward KL at temperature 2) on the small corpus."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    return tiny_recipe(path, small_corpus, tokenizer_dir, cache_dir)


def make_cache(recipe: Path, output_dir: Path, *args: str) -> Path:
    run_cli("cache", "--config", str(recipe), "--output_dir", str(output_dir), *QUIET, *args)
    return output_dir


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, recipe) -> Path:
    return make_cache(recipe, tmp_path_factory.mktemp("topk") / "cache", "--top_k", "8")


def read_all(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every stored array of every block, by split, in block order."""
    cache = TeacherCache(directory)
    out = {}
    for split in ("train", "val"):
        encoded = cache.read(split, list(range(cache.num_blocks(split))))
        out[split] = encoded.arrays()
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    """Same settings and identity, and bit for bit the same targets for every block."""
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (a, b)]
    for key in (
        "mode",
        "top_k",
        "samples",
        "temperature",
        "vocab_size",
        "block_size",
        "num_blocks",
        "identity",
    ):
        assert manifests[0].get(key) == manifests[1].get(key), key
    assert manifests[0]["complete"] and manifests[1]["complete"]
    first, second = read_all(a), read_all(b)
    for split, arrays in first.items():
        for name, values in arrays.items():
            np.testing.assert_array_equal(second[split][name], values, err_msg=f"{split} {name}")


def refusal(capsys, monkeypatch, action) -> str:
    """The one line a refused command prints (it exits with status 2)."""
    monkeypatch.setenv("COLUMNS", "1000")  # the console wraps long lines at its width
    with pytest.raises(SystemExit) as exit_info:
        action()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error:"), err  # (progress bars above)
    return err.splitlines()[-1]


def test_the_cache_holds_every_block_and_records_what_it_was_made_from(topk_cache, recipe):
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["mode"] == "topk" and manifest["top_k"] == 8
    assert manifest["temperature"] == 2.0, "the recipe loss's temperature by default"
    assert 3 * 8 + 6 <= manifest["bytes_per_token"] < 3 * 8 + 6 + 2  # + block indices and headers
    identity = manifest["identity"]
    assert set(identity) >= {"train_data", "tokenizer", "block_size", "teacher"}
    assert json.loads(identity["teacher"]["name"])["model_type"] == "gpt2"
    assert len(identity["teacher"]["config_sha256"]) == len(identity["teacher"]["weights_sha256"]) == 64
    cache = TeacherCache(topk_cache)
    targets = cache.targets("train", [0, cache.num_blocks("train") - 1])  # (2, T, K)
    assert targets.ids.shape == (2, 32, 8)
    assert (targets.log_probs[..., :-1] >= targets.log_probs[..., 1:]).all(), "sorted, most likely first"


def test_an_interrupted_cache_run_resumes_to_the_same_cache(tmp_path, recipe, topk_cache):
    partial = make_cache(recipe, tmp_path / "cache", "--top_k", "8", "--trainer.limit_predict_batches", "2")
    manifest = json.loads((partial / "manifest.json").read_text())
    assert (
        not manifest["complete"]
        and 0 < manifest["splits"]["train"]["blocks"] < manifest["num_blocks"]["train"]
    )
    with pytest.raises(ConfigError, match="the cache run did not finish"):
        TeacherCache(partial)
    make_cache(recipe, partial, "--top_k", "8")  # the same command again: only the missing blocks
    assert_same_cache(topk_cache, partial)
    shards = {path.name: path.stat().st_mtime_ns for path in partial.glob("*.safetensors")}
    make_cache(recipe, partial, "--top_k", "8")  # and once more: nothing is missing, nothing is written
    assert {path.name: path.stat().st_mtime_ns for path in partial.glob("*.safetensors")} == shards
    assert json.loads((partial / "manifest.json").read_text())["complete"]


def test_a_cache_directory_made_with_other_settings_is_refused(recipe, topk_cache, capsys, monkeypatch):
    command = ["cache", "--config", str(recipe), "--output_dir", str(topk_cache), "--top_k", "4", *QUIET]
    assert "cache.top_k=4: differs from 8" in refusal(capsys, monkeypatch, lambda: run_cli(*command))


def test_tail_draws_are_stored_after_the_top_k_and_refused_elsewhere(tmp_path, recipe, capsys, monkeypatch):
    directory = make_cache(recipe, tmp_path / "tail", "--top_k", "8", "--tail_samples", "4")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["tail_samples"] == 4 and manifest["seed"] == 0
    assert 3 * 12 + 6 <= manifest["bytes_per_token"] < 3 * 12 + 6 + 2
    targets = TeacherCache(directory).targets("val", [0])  # (1, T, 12)
    assert targets.ids.shape == (1, 32, 12) and targets.tail_draws == 4
    command = ["cache", "--config", str(recipe), "--output_dir", str(tmp_path / "s"), *QUIET]
    command += ["--mode", "sample", "--tail_samples", "4"]
    err = refusal(capsys, monkeypatch, lambda: run_cli(*command))
    assert "cache.tail_samples=4: applies to --mode topk only" in err


# ------------------------------------------------------------------------------------------ training from it
def fit_from(recipe: Path, run_dir: Path, cache: Path, *overrides: str) -> None:
    run_cli(
        "fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir), *QUIET,
        "--model.init_args.teacher", "null", "--model.init_args.teacher_cache", str(cache), *overrides,
    )  # fmt: skip


STUDENT_600 = json.dumps({**TINY_STUDENT, "vocab_size": 600})
MISMATCHES = {  # what the run changes -> what the one-line error names
    "tokenizer": (
        ["--data.init_args.tokenizer", '{"vocab_size": 300}'],
        "was made with another tokenizer than data.tokenizer",
    ),
    "data": (["--data.init_args.train_files", "CORPUS"], "identity.train_data="),
    "block size": (["--data.init_args.block_size", "16"], "identity.block_size=16"),
    "split": (["--data.init_args.val_fraction", "0.25"], "identity.val_fraction=0.25"),
    "temperature": (["--model.init_args.loss.init_args.temperature", "1.0"], "loss.temperature=1.0"),
    "vocabulary": (["--model.init_args.student", STUDENT_600], "vocab_size=600"),
    "loss": (["--model.init_args.loss", "distilkit.losses.LogitMSELoss"], "needs the teacher's full logits"),
    "teacher too": (["--model.init_args.teacher", json.dumps(TINY_TEACHER)], "together with model.teacher"),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", MISMATCHES, ids=list(MISMATCHES))
def test_training_from_a_cache_that_does_not_match_the_run_is_refused(
    tmp_path, recipe, topk_cache, corpus, capsys, monkeypatch, change
):
    overrides, named = MISMATCHES[change]
    overrides = [str(corpus) if arg == "CORPUS" else arg for arg in overrides]
    err = refusal(capsys, monkeypatch, lambda: fit_from(recipe, tmp_path / "run", topk_cache, *overrides))
    assert named in err, err
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused before training"


@pytest.mark.slow
def test_a_curriculum_stage_that_changes_the_temperature_is_refused_before_training(
    tmp_path, recipe, topk_cache, capsys, monkeypatch
):
    stages = [{"name": "a", "steps": 1}, {"name": "b", "steps": 2, "knobs": {"temperature": 1.0}}]
    curriculum = [{"class_path": "distilkit.CurriculumCallback", "init_args": {"stages": stages}}]
    callbacks = ("--trainer.callbacks", json.dumps(curriculum))
    err = refusal(capsys, monkeypatch, lambda: fit_from(recipe, tmp_path / "run", topk_cache, *callbacks))
    assert "stages[1] (b).knobs={'temperature': 1.0}: loss.temperature=1.0 is not the temperature 2.0" in err


def _subprocess(*args: str) -> None:
    command = [sys.executable, "-m", "distilkit.cli", *args]
    result = subprocess.run(command, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_make_the_same_cache_as_one(tmp_path, recipe):
    """Each process writes its own shards (gloo on CPU); rank 0's manifest covers both. Sampled targets: the
    draws depend on each block's seed only, not on which process drew them."""
    sample = ("--mode", "sample", "--samples", "6")
    one = make_cache(recipe, tmp_path / "one", *sample)
    two = tmp_path / "two"
    processes = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    _subprocess("cache", "--config", str(recipe), "--output_dir", str(two), *QUIET, *sample, *processes)
    assert {p.name.split("-")[1] for p in two.glob("*.safetensors")} == {"r0000", "r0001"}, "a shard each"
    assert_same_cache(one, two)


@pytest.mark.slow
def test_training_from_a_cache_resumes_exactly_after_a_kill(tmp_path, recipe, topk_cache):
    """SIGKILLed mid-run and resumed from its last checkpoint, a run from the cache ends with the weights of
    an uninterrupted one: the batches' block indices address the same targets after the resume."""
    fit = ["fit", "--config", str(recipe), *QUIET, "--model.init_args.teacher", "null"]
    fit += ["--model.init_args.teacher_cache", str(topk_cache), "--trainer.max_steps", "10"]
    fit += ["--data.init_args.batch_size", "2", "--checkpoint.every_n_train_steps", "1"]
    run_cli(*fit, "--trainer.default_root_dir", str(tmp_path / "straight"))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "distilkit.cli", *fit, "--trainer.default_root_dir", str(killed)]
    process = subprocess.Popen(
        command, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed / "checkpoints" / "last.ckpt"
    killed_at = kill_when_checkpointed(process, last, at_step=4)
    assert 4 <= killed_at < 10, "the run was not killed mid-training"

    run_cli(*fit, "--trainer.default_root_dir", str(killed), "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 10
    assert max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]) <= 1e-6


def test_a_teacher_retrained_in_place_is_another_teacher():
    """Same config, other weights: another identity, so an interrupted cache is not completed with it."""
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)
    torch.manual_seed(0)
    first, second = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    one, other = model_identity("teacher", first), model_identity("teacher", second)
    assert one["config_sha256"] == other["config_sha256"] and one["weights_sha256"] != other["weights_sha256"]
    assert model_identity("teacher", first) == one


def test_a_shard_changed_in_place_is_refused_by_name_and_its_recorded_command_rewrites_it(
    tmp_path, recipe, capsys, monkeypatch
):
    """Issue 21.1: same size, other bytes. The fit is refused in one line naming the shard and the command
    that made the cache; running that command again rewrites that shard's blocks only."""
    cache = make_cache(recipe, tmp_path / "cache", "--top_k", "8")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["command"] == shlex.join(
        ["distilkit", "cache", "--config", str(recipe), "--output_dir", str(cache), *QUIET, "--top_k", "8"]
    )
    shard = cache / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    err = refusal(capsys, monkeypatch, lambda: fit_from(recipe, tmp_path / "run", cache))
    assert f"shard {shard.name} has other bytes than were written" in err
    assert f"run `{manifest['command']}` again" in err
    val_shard = cache / manifest["splits"]["val"]["shards"][0]["file"]
    untouched = val_shard.stat().st_mtime_ns
    with pytest.warns(UserWarning, match=f"{shard.name} has other bytes"):
        run_cli(*shlex.split(manifest["command"])[1:])
    assert not shard.exists() and val_shard.stat().st_mtime_ns == untouched, "only the damaged blocks"
    repaired = TeacherCache(cache)
    assert repaired.manifest["complete"]
    fit_from(recipe, tmp_path / "run", cache, "--trainer.max_steps", "1")


@pytest.mark.slow
def test_ctrl_c_keeps_the_blocks_computed_exits_130_and_the_rerun_computes_only_the_rest(tmp_path, recipe):
    """Issue 21.3: with the default shard size the whole cache is one shard per split, held in memory until
    the end; Ctrl-C writes what was computed, says so in one line, and the same command completes it."""
    small = ("--data.init_args.batch_size", "2", "--top_k", "8")
    straight = make_cache(recipe, tmp_path / "straight", *small)
    marker, cache = tmp_path / "reached", tmp_path / "cache"
    slow = json.dumps([{"class_path": "helpers.SlowSteps", "init_args": dict(marker=str(marker), at_step=3)}])
    command = ["cache", "--config", str(recipe), "--output_dir", str(cache), *QUIET, *small]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # tests/: helpers.SlowSteps
    process = subprocess.Popen(
        [sys.executable, "-m", "distilkit", *command, "--trainer.callbacks", slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    returncode, err = signal_at_marker(process, marker, signal.SIGINT)
    assert returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: Ctrl-C: ") and "run the same command again" in last, err[-2000:]
    kept = json.loads((cache / "manifest.json").read_text())
    blocks = kept["splits"]["train"]["blocks"]
    assert 6 <= blocks < kept["num_blocks"]["train"] and f"{blocks} of " in last
    shards = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    make_cache(recipe, cache, *small)
    kept_files = [p for p in cache.glob("*.safetensors") if p.name in shards]
    assert kept_files and all(p.stat().st_mtime_ns == shards[p.name] for p in kept_files), "not rewritten"
    assert_same_cache(straight, cache)


@pytest.mark.slow
def test_a_run_from_a_cache_resumed_from_another_cache_is_refused(
    tmp_path, recipe, topk_cache, capsys, monkeypatch
):
    """Issue 21.2: a cache-trained run records what made its targets (the cache's teacher and settings), so
    a resume from other targets is refused in one line; the checkpoint names the teacher behind the cache."""
    run_dir = tmp_path / "run"
    fit_from(recipe, run_dir, topk_cache, "--trainer.max_steps", "2")
    taught = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["distilkit"]["teacher"]
    assert taught["kind"] == "cache" and taught["targets"]["top_k"] == 8
    assert len(taught["teacher"]["weights_sha256"]) == 64
    sampled = make_cache(recipe, tmp_path / "sampled", "--mode", "sample", "--samples", "6")
    err = refusal(
        capsys,
        monkeypatch,
        lambda: fit_from(recipe, run_dir, sampled, "--trainer.max_steps", "4", "--ckpt_path", "last"),
    )
    assert f"error: model.teacher_cache='teacher cache {sampled} (sample, S = 6, temperature 2.0)" in err
    assert f"trained by up to step 2: teacher cache {topk_cache} (topk, K = 8, temperature 2.0)" in err


def test_a_served_teacher_refuses_tail_draws() -> None:
    """A server answers with its top K only: draws from the tail would need its whole distribution."""
    from distilkit.commands.cache import CacheOptions, check_served_options

    assert check_served_options(CacheOptions(output_dir="x", top_k=20)) == 1.0
    with pytest.raises(ConfigError, match="tail_samples=4: needs the teacher's whole distribution"):
        check_served_options(CacheOptions(output_dir="x", top_k=20, tail_samples=4))
