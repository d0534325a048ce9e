"""Exact resume: an interrupted run, resumed from its last checkpoint, ends with the same student."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    branch_point,
    csv_rows,
    fit_run,
    kill_when_checkpointed,
    make_datamodule,
    read_records,
    resume_run,
    rewound_history,
    run_file,
    signal_at_marker,
    tiny_module,
    tiny_recipe,
    tiny_trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from distilkit.data.sampler import ResumableSampler

WANDB = '[{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "t"}}]'


class BatchLog(Callback):
    def __init__(self) -> None:
        self.first_ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first_ids.append(int(batch["input_ids"][0, 0]))


def _batches(sampler: ResumableSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)  # as Lightning does before each epoch
    items = list(sampler)
    return [items[i : i + sampler.batch_size] for i in range(0, len(items), sampler.batch_size)]


def test_the_sampler_resumes_mid_epoch_and_at_an_epoch_end():
    straight = ResumableSampler(10, 3, seed=7)
    epochs = [_batches(straight, epoch) for epoch in range(3)]
    assert len(epochs[0]) == 3 and epochs[0] != epochs[1]
    resumed = ResumableSampler(10, 3, seed=7)
    resumed.resume_at(1, 2)
    assert _batches(resumed, 1) == epochs[1][2:] and _batches(resumed, 2) == epochs[2]
    at_end = ResumableSampler(10, 3, seed=7)
    at_end.resume_at(1, 0)  # what TextDataModule.state_dict says after an epoch's last batch
    assert _batches(at_end, 1) == epochs[1]


def test_processes_share_out_each_global_batch():
    """Two processes with batch 3 see, step by step, the items one process with batch 6 sees."""
    one = ResumableSampler(20, 6, seed=3)
    ranks = [ResumableSampler(20, 3, seed=3, num_replicas=2, rank=rank) for rank in (0, 1)]
    for epoch in range(2):
        shares = [_batches(sampler, epoch) for sampler in ranks]
        assert _batches(one, epoch) == [a + b for a, b in zip(*shares, strict=True)]


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


def _assert_same_student(straight_dir: Path, resumed_dir: Path, steps: int, name: str = "last.ckpt") -> None:
    """The resumed run reached ``steps`` with the uninterrupted run's weights (max abs difference ≤ 1e-6)."""
    a = torch.load(straight_dir / "checkpoints" / name, weights_only=True)["state_dict"]
    b = torch.load(resumed_dir / "checkpoints" / name, weights_only=True)
    assert b["global_step"] == steps
    assert max(float((a[k] - b["state_dict"][k]).abs().max()) for k in a) <= 1e-6


def _wandb_losses(files: list[Path]) -> list[tuple[int, int, float | None, float | None]]:
    """``(W&B step, trainer/global_step, train/loss, val/loss)`` of the history W&B shows after a sync."""
    return [
        (int(row["_step"]), int(row["trainer/global_step"]), row.get("train/loss"), row.get("val/loss"))  # type: ignore[arg-type]
        for row in rewound_history(files)
        if "trainer/global_step" in row
    ]


def _assert_same_logs(straight, resumed) -> None:
    assert [row[:-2] for row in resumed] == [row[:-2] for row in straight], "a step dropped or logged twice"
    for a, b in zip(straight, resumed, strict=True):
        for x, y in zip(a[-2:], b[-2:], strict=True):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5 * max(1.0, abs(x)))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights_and_logs(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    """Weights, ``metrics.csv`` and the W&B history (offline) of a SIGKILLed and resumed run match an
    uninterrupted run's: the rows the killed run logged past its checkpoint are replaced, not repeated."""
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=12, val_check_interval=4
    )
    cli = _cli(recipe, "--checkpoint.every_n_train_steps", "1", "--trainer.logger", WANDB)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    _run(cli, tmp_path / "straight", env)

    # 0.3 s steps, so the kill lands just after step 5's checkpoint, between validations: killed in the
    # moment between a step's checkpoint and that step's validation, a resume skips the validation
    # (Lightning fast-forwards it), which is not what this test is about
    slow = json.dumps(
        [{"class_path": "helpers.SlowSteps", "init_args": {"marker": str(tmp_path / "m"), "at_step": 0}}]
    )
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [*cli, "--trainer.default_root_dir", str(killed_dir), "--trainer.callbacks", slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed_dir / "checkpoints" / "last.ckpt"
    killed_at = kill_when_checkpointed(process, last, at_step=5)
    assert 5 <= killed_at < 12, "the run was not killed mid-training"

    _run(cli, killed_dir, env, "--ckpt_path", "last")
    _assert_same_student(tmp_path / "straight", killed_dir, 12)
    _assert_same_logs(csv_rows(tmp_path / "straight"), csv_rows(killed_dir))
    # W&B: the resumed part rewinds to the checkpoint and logs every later step once. (What the killed part
    # wrote offline is lost with it: W&B's service buffers its file and dies with the process.)
    resumed_part = run_file(killed_dir)
    assert branch_point(read_records(resumed_part)) == killed_at - 1
    straight = _wandb_losses([run_file(tmp_path / "straight")])
    _assert_same_logs(straight[killed_at:], _wandb_losses([resumed_part]))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tmp_path, corpus, tokenizer_dir, cache_dir):
    """SIGTERM writes last.ckpt and exits 143. Resuming from the earlier step-4 checkpoint instead, past which
    the stopped run has logged more steps, still gives the uninterrupted run's weights, metrics.csv and
    W&B history: those rows are replaced (CSV rewind, W&B ``resume_from`` rewind), not repeated. (An explicit
    checkpoint path also checks that the recipe's loss is kept, not the checkpoint's partial hparams.)"""
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=12, val_check_interval=4
    )
    cli = _cli(recipe, "--checkpoint.every_n_train_steps", "4", "--trainer.logger", WANDB)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # tests/: helpers.SlowSteps
    _run(cli, tmp_path / "straight", env)

    marker = tmp_path / "reached"
    slow = f'[{{"class_path": "helpers.SlowSteps", "init_args": {{"marker": "{marker}", "at_step": 5}}}}]'
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen(
        [*cli, "--trainer.default_root_dir", str(run_dir), "--trainer.callbacks", slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    returncode, err = signal_at_marker(process, marker, signal.SIGTERM)
    assert returncode == 143, err[-2000:]
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 5 <= stopped_at < 12
    (step_4,) = (run_dir / "checkpoints").glob("*step=4.ckpt")
    assert max(row[0] for row in csv_rows(run_dir)) == stopped_at - 1, "rows past the step-4 checkpoint"

    _run(cli, run_dir, env, "--ckpt_path", str(step_4))
    # (Lightning leaves the stopped run's last.ckpt alone when the resume started elsewhere: last-v1.ckpt)
    _assert_same_student(tmp_path / "straight", run_dir, 12, name="epoch=0-step=12.ckpt")
    _assert_same_logs(csv_rows(tmp_path / "straight"), csv_rows(run_dir))
    run_file(run_dir)  # the resumed part has finished writing
    parts = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(parts) == 2 and branch_point(read_records(parts[1])) == 3
    _assert_same_logs(_wandb_losses([run_file(tmp_path / "straight")]), _wandb_losses(parts))


def test_a_step_is_logged_to_disk_before_its_checkpoint_is_written(tmp_path, datamodule):
    """A kill right after a checkpoint of step N must not lose step N's row: it is on disk already."""
    from distilkit import DistillationModule
    from distilkit.run.loggers import CSVLogger

    rows_at_save: dict[int, list[int]] = {}

    class Recording(DistillationModule):
        def on_save_checkpoint(self, checkpoint):
            super().on_save_checkpoint(checkpoint)
            rows_at_save[self.global_step] = [step for step, _, _ in csv_rows(tmp_path)]

    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = tiny_trainer(
        tmp_path,
        max_steps=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    trainer.fit(tiny_module(datamodule, cls=Recording), datamodule)
    assert {step: rows[-1] for step, rows in rows_at_save.items()} == {1: 0, 2: 1, 3: 2}
    assert [step for step, _, _ in csv_rows(tmp_path)] == [0, 1, 2], "and each row written once"


@pytest.mark.slow
def test_a_run_killed_between_a_checkpoint_and_its_validation_runs_that_validation_on_resume(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    """Killed after step 4's checkpoint and before step 4's validation: the resumed run validates at step 4
    first, so ``metrics.csv`` (every validation row included) and the weights are the uninterrupted run's."""
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=6, val_check_interval=2
    )
    cli = _cli(recipe, "--checkpoint.every_n_train_steps", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    _run(cli, tmp_path / "straight", env)
    killed_dir = tmp_path / "killed"
    kill = json.dumps([{"class_path": "helpers.KillAtValidation", "init_args": {"at_step": 4}}])
    died = subprocess.run(
        [*cli, "--trainer.default_root_dir", str(killed_dir), "--trainer.callbacks", kill],
        env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    assert died.returncode == -signal.SIGKILL
    assert torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not any(val is not None and step == 3 for step, _, val in csv_rows(killed_dir)), "killed before it"

    _run(cli, killed_dir, env, "--ckpt_path", "last")
    straight = csv_rows(tmp_path / "straight")
    assert [step for step, _, val in straight if val is not None] == [1, 3, 5]
    _assert_same_logs(straight, csv_rows(killed_dir))
    _assert_same_student(tmp_path / "straight", killed_dir, 6)


@pytest.mark.slow
def test_a_resume_with_another_teacher_is_refused_unless_asked_for_and_the_summary_names_it(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys, monkeypatch
):
    """Issue 21.2: the checkpoint records what taught the run. Another teacher (here the random teacher of
    another seed: same config, other weights) is refused in one line before any step; with
    --allow_teacher_change true the run goes on, and its checkpoint and summary name both teachers."""
    monkeypatch.setenv("COLUMNS", "1000")
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=2)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    out = capsys.readouterr().out
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["distilkit"]["teacher"]
    assert first["kind"] == "live" and len(first["weights_sha256"]) == 64
    teacher = f"a random-init gpt2 config mapping (weights sha256 {first['weights_sha256'][:12]})"
    assert f"teacher            {teacher}" in out
    with pytest.raises(SystemExit) as exit_info:
        resume_run(recipe, run_dir, 4, "--seed_everything", "1")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "error: model.teacher='a random-init gpt2 config mapping (weights sha256" in err
    assert f"is not the teacher this run was trained by up to step 2: {teacher}" in err
    assert "pass --allow_teacher_change true" in err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resume_run(recipe, run_dir, 4, "--seed_everything", "1", "--allow_teacher_change", "true")
    extras = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["distilkit"]
    assert extras["earlier_teachers"] == [{"until_step": 2, "teacher": first}]
    assert extras["teacher"]["weights_sha256"] != first["weights_sha256"]
    assert f"until step 2: {teacher}" in capsys.readouterr().out
