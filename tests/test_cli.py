"""The `distilkit` command: recipes parse, fit -> export -> reload -> generate, resume, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fit_run, resume_run, run_cli, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilkit import DistillationModule

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def recipe_command(recipe: Path) -> list[str]:
    """The `distilkit fit ...` command a recipe opens with (the line that names the recipe)."""
    lines = [
        line.lstrip("# ").split("  ")[0] for line in recipe.read_text().splitlines() if line.startswith("#")
    ]
    command = next((line for line in lines if line.startswith("distilkit fit") and recipe.name in line), None)
    assert command is not None, f"{recipe.name} must open with its `distilkit fit` command"
    return command.split()[1:]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_parses_and_opens_with_its_command(recipe, capsys):
    assert recipe.read_text().startswith("# distilkit "), f"{recipe.name} must open with its command"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*recipe_command(recipe), "--print_config")
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("DistillationModule")
    assert printed["data"]["class_path"].endswith("TextDataModule")


def test_fit_export_reload_generate(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, {"vocab_size": 400}, cache_dir)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/kd_loss", "val/ppl", "val/teacher_ppl", "val/top1_agreement"} <= set(header)

    export_dir = tmp_path / "student"
    run_cli("export", "--ckpt_path", str(last), "--output_dir", str(export_dir))
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert len(tokenizer) == 400 and tokenizer.eos_token == "<|endoftext|>"

    module = DistillationModule.load_from_checkpoint(last, weights_only=True)
    ids = tokenizer("The for statement", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.eval()(ids), rtol=1e-5, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)

    with pytest.raises(SystemExit) as exit_info:  # export never writes over a directory
        run_cli("export", "--ckpt_path", str(last), "--output_dir", str(export_dir))
    assert exit_info.value.code == 2


def test_resume_from_a_checkpoint(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir, "--trainer.enable_progress_bar", "false")  # drops the CLI's progress bar
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 4
    config_before = (run_dir / "config.yaml").read_text()

    resume_run(recipe, run_dir, 6)
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 6
    assert (run_dir / "config.yaml").read_text() == config_before, "the first config was overwritten"
    assert (run_dir / "config.resumed-1.yaml").is_file()
    steps = [int(line.split(",")[1]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert min(steps) < 4 <= max(steps), "resumed metrics were not appended to the first run's"


@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.init_args.kd_ratio", "1.5"], "model.kd_ratio=1.5: must lie in [0.0, 1.0]"),
        (
            ["--model.init_args.loss.init_args.temperature", "0"],
            "loss.temperature=0.0: must be a finite number > 0",
        ),
        (
            ["--model.init_args.teacher", "no/such/teacher/dir"],
            "model.teacher='no/such/teacher/dir': does not exist; give a Hugging Face model directory",
        ),
        (
            ["--data.init_args.train_files", "missing.jsonl"],
            "data.train_files='missing.jsonl': does not exist",
        ),
        (["--model.init_args.kd_ratoi", "0.3"], "Option 'kd_ratoi' is not accepted"),
        (["--model.init_args.student", '{"model_type": "gpt2", "n_layers": 2}'], "did you mean 'n_layer'"),
        (
            ["--model.init_args.teacher", '{"model_type": "gpt2", "n_layer": 1, "vocab_size": 300}'],
            "model.teacher='vocabulary of 300': differs from the student's 512",
        ),
        (["--data.init_args.block_size", "abc"], "error: data.block_size='abc': is not an int; give an int."),
        (["--model.init_args.kd_ratio", "null"], "kd_ratio"),
        (
            ["--model.init_args.nonfinite", "maybe"],
            "error: model.nonfinite='maybe': is not one of 'stop', 'skip'; give one of 'stop', 'skip'.",
        ),
        (
            ["--model.init_args.vocab_size", "abc"],
            "error: model.vocab_size='abc': is not an int; give an int.",
        ),
        (
            ["--model.init_args.loss.init_args.temperature", "hot"],
            "error: model.loss.temperature='hot': is not a float; give a float.",
        ),
        (["--ckpt_path", "last"], "ckpt_path='last': found no last*.ckpt in"),
        (["--ckpt_path", "no/such.ckpt"], "ckpt_path='no/such.ckpt': is not a file"),
        (["--data.init_args.train_files", "data.csv"], "has an unsupported suffix '.csv'"),
        (["--data.init_args.batch_size", "1000"], "data.batch_size=1000: needs 1000 training blocks"),
        (
            [
                "--trainer.max_steps",
                "3",
                "--model.init_args.lr_scheduler",
                '{"class_path": '
                '"torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.01, "total_steps": 300}}',
            ],
            "lr_scheduler.init_args.total_steps=300: is not the run's length of 3 optimizer steps",
        ),
        (
            [
                "--model.init_args.teacher",
                "null",
                "--model.init_args.student",
                '{"from_teacher": {"n_layer": 1}}',
            ],
            "model.student.from_teacher={'n_layer': 1}: cuts the student from the teacher, but there is no",
        ),
        (
            ["--model.init_args.student", '{"from_teacher": {"n_embd": 128}}'],
            "model.student.from_teacher.n_embd=128: exceeds the teacher's n_embd=64",
        ),
        (
            ["--model.init_args.student", '{"from_teacher": {"n_embd": 63}}'],
            "model.student.from_teacher.n_head=2: must divide n_embd=63",
        ),
        (
            ["--model.init_args.student", '{"from_teacher": {"layers": [0, 2]}}'],
            "model.student.from_teacher.layers=[0, 2]: holds 2, not a block index in [0, 1]",
        ),
        (
            ["--model.init_args.student", '{"from_teacher": {"layers": [1, 1]}}'],
            "model.student.from_teacher.layers=[1, 1]: repeats a block",
        ),
    ],
)
def test_bad_input_exits_2_with_one_clear_message_and_writes_nothing(
    override, message, tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(SystemExit) as exit_info:
        fit_run(recipe, run_dir, *[o.replace("data.csv", str(tmp_path / "data.csv")) for o in override])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_an_existing_run_is_never_overwritten(tmp_path, corpus, tokenizer_dir, cache_dir, capsys):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        fit_run(recipe, run_dir)
    assert exit_info.value.code == 2
    assert "already holds a run" in " ".join(capsys.readouterr().err.split())
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_the_console_script_reports_user_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distilkit.cli",
            "export",
            "--ckpt_path",
            str(tmp_path / "none.ckpt"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "ckpt_path=" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", ["quickstart.yaml", "baseline.yaml", "curriculum.yaml", "code_teacher.yaml"]
)
def test_small_recipes_run_end_to_end(recipe, tmp_path, cache_dir, capsys):
    """The shipped recipes as a user runs them, cut to a few steps by ``--trainer.max_steps`` alone (the full
    runs are `make quickstart`)."""
    root = Path(__file__).parents[1]
    run_dir = tmp_path / "run"
    run_cli(
        "fit",
        "--config",
        str(root / "recipes" / recipe),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--data.init_args.cache_dir",
        str(cache_dir),
    )  # --trainer.max_steps alone: the recipes' schedules take the run's length
    summary = " ".join(capsys.readouterr().out.split())
    assert f"run directory {run_dir}" in summary and "student val ppl" in summary
    assert "distilkit export --ckpt_path" in summary
    assert ("teacher val ppl" in summary) == (recipe not in ("baseline.yaml", "code_teacher.yaml"))
    assert (run_dir / "learning_curve.png").is_file()


def test_an_empty_dataset_exits_2_before_writing_the_run(tmp_path, tokenizer_dir, cache_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    recipe = tiny_recipe(tmp_path / "tiny.yaml", empty, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        fit_run(recipe, run_dir)
    assert exit_info.value.code == 2
    assert "holds no text" in " ".join(capsys.readouterr().err.split())
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_a_diverging_run_stops_with_exit_1_and_one_message(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=8)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            "fit",
            "--config",
            str(recipe),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--model.init_args.optimizer.init_args.lr",
            "1e30",
        )
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "stopped: step" in err and "non-finite" in err and "Traceback" not in err


def test_the_export_command_after_a_fit_is_one_quoted_line(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=1)
    run_dir = tmp_path / "a run with spaces"
    fit_run(recipe, run_dir)
    line = next(line for line in capsys.readouterr().out.splitlines() if "distilkit export" in line)
    command = line.split(": ", 1)[1]
    assert (
        command
        == f"distilkit export --ckpt_path '{run_dir}/checkpoints/last.ckpt' --output_dir '{run_dir}/export'"
    )
