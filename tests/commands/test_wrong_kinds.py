"""Paths that exist but are the wrong kind (a file given as a directory, a directory given as a file) end in
one line naming the option, with exit status 2, before any work (issue 21.5)."""

from __future__ import annotations

import pytest
from helpers import TEACHER, run_cli, tiny_recipe


@pytest.fixture
def places(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    return tmp_path / "afile", tmp_path / "adir"


def refused(capsys, monkeypatch, *command: str) -> str:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*command)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.splitlines()[-1]


def test_fit_and_cache_refuse_a_file_given_as_their_directory(
    places, tmp_path, corpus, tokenizer_dir, cache_dir, capsys, monkeypatch
):
    afile, _ = places
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    line = refused(
        capsys, monkeypatch, "fit", "--config", str(recipe), "--trainer.default_root_dir", str(afile)
    )
    root = "trainer.default_root_dir"
    assert line == f"error: {root}='{afile}': is a file, not a directory; give a directory for the run."
    line = refused(capsys, monkeypatch, "cache", "--config", str(recipe), "--output_dir", str(afile))
    assert line.startswith(f"error: output_dir='{afile}': is a file, not a directory")
    fit = ["fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run")]
    line = refused(
        capsys,
        monkeypatch,
        *fit,
        "--model.init_args.teacher",
        "null",
        "--model.init_args.teacher_cache",
        str(afile),
    )
    assert line.startswith(f"error: model.teacher_cache='{afile}': is a file, not a cache directory")


def test_export_prune_and_models_refuse_the_wrong_kind(places, tiny_run, capsys, monkeypatch):
    afile, adir = places
    line = refused(
        capsys,
        monkeypatch,
        "export",
        "--ckpt_path",
        str(tiny_run),
        "--output_dir",
        str(afile),
        "--overwrite",
        "true",
    )
    assert line.startswith(f"error: output_dir='{afile}': is a file, not a directory")
    line = refused(capsys, monkeypatch, "export", "--ckpt_path", str(adir), "--output_dir", str(adir / "x"))
    assert line.startswith(f"error: ckpt_path='{adir}': is a directory, not a checkpoint file")
    prune = ["prune", "--teacher", str(TEACHER), "--targets", "{n_layer: 2}", "--layers", "[0, 1]"]
    line = refused(capsys, monkeypatch, *prune, "--importance", "magnitude", "--output_dir", str(afile))
    assert line.startswith(f"error: output_dir='{afile}': is a file, not a directory")
    line = refused(
        capsys,
        monkeypatch,
        *prune,
        "--importance",
        "magnitude",
        "--teacher",
        str(afile),
        "--output_dir",
        str(adir / "s"),
    )
    assert line.startswith(f"error: teacher='{afile}': is a file, not a model directory")
    line = refused(
        capsys, monkeypatch, "generate", "--model", str(afile), "--output_file", str(adir / "s.jsonl")
    )
    assert line.startswith(f"error: model='{afile}': is a file but neither a .ckpt nor a .gguf file")


def test_a_model_path_that_does_not_exist_is_refused_at_once_not_looked_up_on_the_hub(
    places, capsys, monkeypatch
):
    """``runs/pruned-student`` before prune wrote it: ``runs/`` exists, so it is a path, not ``org/model``."""
    _, adir = places
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no shortcut: the path must be seen as local
    monkeypatch.chdir(adir.parent)
    line = refused(
        capsys, monkeypatch, "generate", "--model", "adir/pruned-student", "--output_file", "s.jsonl"
    )
    assert line.startswith("error: model='adir/pruned-student': is neither a .ckpt file")
    from distilkit.errors import ConfigError
    from distilkit.models.loading import load_causal_lm

    with pytest.raises(ConfigError, match=r"model.student='adir/pruned-student': does not exist"):
        load_causal_lm("adir/pruned-student", field="model.student")
