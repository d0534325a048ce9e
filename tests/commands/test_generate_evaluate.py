"""`distilkit generate` and `distilkit evaluate` end to end on tiny and shipped models."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, TEACHER, run_cli, tiny_recipe

from distilkit.commands.evaluate import evaluate
from distilkit.commands.generate import generate
from distilkit.errors import ConfigError


def test_generate_writes_jsonl_that_training_reads(tmp_path, tiny_run, corpus, tokenizer_dir, cache_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The for statement\nA function\n")
    out = generate(
        str(tiny_run),
        str(tmp_path / "samples.jsonl"),
        prompts_file=str(prompts),
        num_samples=3,
        max_new_tokens=12,
        temperature=0.8,
        top_p=0.9,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert [r["prompt"] for r in rows] == ["The for statement"] * 3 + ["A function"] * 3
    assert all(r["text"] == r["prompt"] + r["completion"] and r["completion"] for r in rows)
    # the samples are training data: a few steps of a fit on them
    recipe = tiny_recipe(
        tmp_path / "seq.yaml", out, tokenizer_dir, cache_dir, max_steps=2, val_check_interval=2
    )
    run_cli(
        "fit",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(tmp_path / "seq-run"),
        "--data.init_args.val_files",
        str(corpus),
        "--data.init_args.block_size",
        "8",
    )
    assert (tmp_path / "seq-run" / "checkpoints" / "last.ckpt").is_file()


def test_generate_unconditional_from_a_model_directory_and_refuses_to_overwrite(tmp_path):
    out = generate(str(TEACHER), str(tmp_path / "u.jsonl"), num_samples=2, max_new_tokens=10, seed=1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "" and r["text"] for r in rows)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("generate", "--model", str(TEACHER), "--output_file", str(out))
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"model": "nowhere"}, "neither a .ckpt file"),
    ],
)
def test_generate_bad_input(tmp_path, kwargs, match):
    from distilkit.errors import ConfigError

    options = {"model": str(TEACHER), "output_file": str(tmp_path / "x.jsonl"), **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate(**options)


def test_evaluate_scores_models_against_the_teacher(tmp_path, tiny_run, corpus):
    out = tmp_path / "eval.json"
    rows = evaluate(
        [str(tiny_run)],
        data_files=str(corpus),
        teacher=None,
        block_size=32,
        batch_size=4,
        output_json=str(out),
    )
    assert json.loads(out.read_text()) == rows
    assert rows[0]["model"] == str(tiny_run) and rows[0]["ppl"] > 1


def test_evaluate_against_an_identical_teacher_gives_full_agreement_and_zero_kl(tmp_path, tiny_run, corpus):
    from distilkit.commands.export import export_student

    exported = export_student(tiny_run, tmp_path / "student")
    rows = evaluate(
        [str(exported)], data_files=str(corpus), teacher=str(exported), block_size=32, batch_size=4
    )
    teacher_row, student_row = rows
    assert teacher_row["ppl"] == pytest.approx(student_row["ppl"], rel=1e-5)
    assert student_row["top1_agreement"] == pytest.approx(1.0)
    assert student_row["kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_the_seqkd_recipe_runs_a_few_steps_on_teacher_samples(tmp_path, cache_dir):
    samples = generate(str(TEACHER), str(tmp_path / "teacher.jsonl"), num_samples=8, max_new_tokens=40)
    run_cli(
        "fit",
        "--config",
        str(ROOT / "recipes" / "seqkd.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--data.init_args.train_files",
        str(samples),
        "--trainer.max_steps",
        "2",
        "--model.init_args.lr_scheduler.init_args.total_steps",  # the recipe's schedule follows the run
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "2",
        "--data.init_args.block_size",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.cache_dir",
        str(cache_dir),
    )
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# -------------------------------------------------------------------------- issue 11: check, then work
def test_unwritable_outputs_are_refused_before_any_scoring_or_sampling(tmp_path, tiny_run, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    for command, field in (
        (
            ["evaluate", "--models", f"[{tiny_run}]", "--output_json", str(blocked / "eval.json")],
            "output_json",
        ),
        (["generate", "--model", str(tiny_run), "--output_file", str(blocked / "s.jsonl")], "output_file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*command)
        err = " ".join(capsys.readouterr().err.split())
        assert exit_info.value.code == 2 and f"{field}=" in err and "cannot be written" in err
        assert "Traceback" not in err


def test_evaluate_uses_the_block_size_a_checkpoint_was_trained_with_and_refuses_a_longer_one(
    tiny_run, corpus, capsys
):
    rows = evaluate([str(tiny_run)], data_files=str(corpus), progress=False)
    assert rows[0]["tokens"] % 32 == 0  # the tiny run trained with block_size 32
    with pytest.raises(SystemExit) as exit_info:
        run_cli("evaluate", "--models", f"[{tiny_run}]", "--data_files", str(corpus), "--block_size", "5000")
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "block_size=5000" in err and "positions" in err


def test_evaluate_refuses_a_teacher_whose_tokenizer_differs(tmp_path, tiny_run, corpus, capsys):
    from helpers import tiny_model_dir

    from distilkit.data.tokenizer import train_bpe

    other = train_bpe(
        ["completely different text " * 50, "zzz yyy xxx " * 40], vocab_size=300, show_progress=False
    )
    teacher = tiny_model_dir(tmp_path / "teacher", other)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            "evaluate", "--models", f"[{tiny_run}]", "--teacher", str(teacher), "--data_files", str(corpus)
        )
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "first differences:" in err and "teacher" in err


def test_ctrl_c_during_generate_keeps_finished_batches_and_the_rerun_samples_only_the_rest(
    tmp_path, monkeypatch, capsys
):
    """Issue 21.3: each batch has its own seed, so the finished file is what an uninterrupted run writes."""
    import os
    import signal

    from distilkit.commands import generate as command

    options = dict(num_samples=6, batch_size=2, max_new_tokens=8, seed=3)
    straight = generate(str(TEACHER), str(tmp_path / "straight.jsonl"), **options)
    out = tmp_path / "stopped.jsonl"
    sampled = []
    real = command.generate_text

    def ctrl_c_after_the_second_batch(*args, **kwargs):
        sampled.append(1)
        if len(sampled) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "generate_text", ctrl_c_after_the_second_batch)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("generate", "--model", str(TEACHER), "--output_file", str(out), *_flags(options))
    assert exit_info.value.code == 130
    assert f"stopped: Ctrl-C: 4 of 6 samples are in {out}.partial" in capsys.readouterr().err
    assert not out.exists() and len((tmp_path / "stopped.jsonl.partial").read_text().splitlines()) == 4
    sampled.clear()
    with pytest.raises(ConfigError, match=r"unfinished run in .* made with another seed \(3, now 4\)"):
        generate(str(TEACHER), str(out), **{**options, "seed": 4})
    generate(str(TEACHER), str(out), **options)
    assert len(sampled) == 1, "only the missing batch is sampled"
    assert out.read_text() == straight.read_text()
    assert not list(tmp_path.glob("*.partial*"))


def _flags(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def test_prompts_are_named_by_file_and_line(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("a short one\n" + "word " * 600 + "\n")
    fills = rf"prompts_file='{long}:2': is \d+ tokens long, which fills the model's context of 128"
    with pytest.raises(ConfigError, match=fills):
        generate(str(TEACHER), str(tmp_path / "x.jsonl"), prompts_file=str(long))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a"}\n{"text": 3}\n')
    with pytest.raises(ConfigError, match=rf"prompts_file='{rows}:2': has no text in 'prompt'"):
        generate(str(TEACHER), str(tmp_path / "x.jsonl"), prompts_file=str(rows))
    with pytest.raises(ConfigError, match=rf"prompts_file='{tmp_path}': is a directory"):
        generate(str(TEACHER), str(tmp_path / "x.jsonl"), prompts_file=str(tmp_path))
    with pytest.raises(ConfigError, match=rf"output_file='{tmp_path}': is a directory"):
        generate(str(TEACHER), str(tmp_path), overwrite=True)


def test_evaluate_names_its_own_options_in_errors(tmp_path, tiny_run, capsys, monkeypatch):
    """Issue 21.5: the data module evaluate builds is named by evaluate's options, not a recipe's fields."""
    monkeypatch.setenv("COLUMNS", "1000")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for options, named in (
        (["--data_files", str(empty)], f"error: data_files='{empty}'"),
        (["--data_files", str(tmp_path / "absent.txt")], "error: data_files"),
        (["--models", f"[{tmp_path}]"], f"error: models[0]='{tmp_path}'"),
        (["--output_json", str(tmp_path)], f"error: output_json='{tmp_path}': is a directory"),
    ):
        models = [] if "--models" in options else ["--models", f"[{tiny_run}]"]
        with pytest.raises(SystemExit) as exit_info:
            run_cli("evaluate", *models, *options, "--progress", "false")
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith(named) and "data.train_files" not in err, err


def test_ctrl_c_during_evaluate_keeps_the_rows_scored_and_the_rerun_scores_only_the_rest(
    tmp_path, tiny_run, corpus, monkeypatch, capsys
):
    """Issue 21.3: each model's row is kept as soon as it is scored (by content: model, data, settings)."""
    import os
    import signal

    from distilkit.commands import evaluate as command

    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp_path / "cache"))  # no rows kept by other tests
    exported = tmp_path / "exported"
    run_cli("export", "--ckpt_path", str(tiny_run), "--output_dir", str(exported))
    scored = []
    real = command._score

    def ctrl_c_in_the_second_model(entry, *args):
        scored.append(entry.name)
        if len(scored) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the second model's validation
        return real(entry, *args)

    monkeypatch.setattr(command, "_score", ctrl_c_in_the_second_model)
    models = ["--models", f"[{tiny_run}, {exported}]", "--data_files", str(corpus), "--progress", "false"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli("evaluate", *models)
    assert exit_info.value.code == 130
    assert (
        "stopped: Ctrl-C: 1 of 2 models scored (their rows are kept); run the same command again"
        in capsys.readouterr().err
    )
    scored.clear()
    rows = evaluate([str(tiny_run), str(exported)], data_files=str(corpus), progress=False)
    assert scored == [str(exported)], "only the model without a kept row is scored"
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-5)  # the same weights
