"""Weights & Biases from a recipe, offline: read back what the run wrote."""

from __future__ import annotations

import json

from helpers import (
    ROOT,
    config_keys,
    fit_run,
    history_keys,
    read_records,
    resume_run,
    run_cli,
    run_file,
    tiny_recipe,
)

from distilkit.run.directory import wandb_can_go_online

WANDB = (
    '[{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "distilkit-tests"}}]'
)


def test_a_recipe_adds_wandb_which_runs_offline_and_logs_every_loss_term(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    run_cli(
        "fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir), "--trainer.logger", WANDB
    )
    assert (run_dir / "metrics.csv").is_file(), "the CSV logger is always kept"
    records = read_records(run_file(run_dir))
    keys = history_keys(records)
    assert {"train/loss", "train/ce_loss", "train/kd_loss", "val/loss", "val/ppl", "val/teacher_ppl"} <= keys
    assert any(r.HasField("run") and r.run.run_id for r in records)


def test_without_credentials_wandb_goes_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_can_go_online()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_can_go_online()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_can_go_online()


def test_the_wandb_recipe_logs_nested_config_samples_throughput_and_the_curve(
    tmp_path, corpus, tokenizer_dir, cache_dir
):
    root = ROOT
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=6, val_check_interval=3
    )
    run_dir = tmp_path / "run"
    run_cli(
        "fit",
        "--config",
        str(recipe),
        "--config",
        str(root / "recipes" / "quickstart_wandb.yaml"),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.max_steps",
        "6",
    )
    records = read_records(run_file(run_dir))
    config = config_keys(records)
    assert {"model", "data", "trainer"} <= config, "the resolved config is logged whole, nested"
    nested = next(
        json.loads(i.value_json)
        for r in records
        if r.HasField("config")
        for i in r.config.update
        if (i.key or "/".join(i.nested_key)) == "model"
    )
    assert nested["init_args"]["loss"]["init_args"]["temperature"] == 2.0
    keys = history_keys(records)
    assert {"train/loss", "train/ce_loss", "train/kd_loss", "train/lr", "val/ppl", "val/kl"} <= keys
    assert {"samples/_type", "learning_curve/_type"} <= keys, "the sample table and the curve image"
    assert "train/device/items_per_sec" in keys, "tokens per second"
    files = {f.path for r in records if r.HasField("files") for f in r.files.files}
    assert any(p.startswith("media/table/samples_") for p in files)
    assert any(p.startswith("media/images/learning_curve") for p in files)
    table_rows = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(table_rows) == 2 * 3  # two validations x three prompts


def test_resuming_from_a_checkpoint_continues_the_same_wandb_run(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir, "--trainer.logger", WANDB)
    first = [r.run.run_id for r in read_records(run_file(run_dir)) if r.HasField("run")][0]
    resume_run(recipe, run_dir, 6, "--trainer.logger", WANDB)
    runs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(path.name == f"run-{first}.wandb" for path in runs)
