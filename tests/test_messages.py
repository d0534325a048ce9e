"""Messages print as written (issue 21.4): no console markup or emoji codes are read in what distilkit prints,
so brackets (``pip install 'distilkit[lora]'``, ``target_modules: [c_attn]``) and colons (``:memo:``) stay."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from distilkit import cli
from distilkit.commands.cache import print_cache_summary
from distilkit.commands.evaluate import print_rows
from distilkit.errors import ConfigError, RunInterrupted, TrainingStopped

WRITTEN = "pip install 'distilkit[lora]' with target_modules: [c_attn, c_proj] in runs/:memo:/[x]"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigError("model.student_adapter", WRITTEN, "needs peft", f"run {WRITTEN}"), 2),
        (TrainingStopped(WRITTEN), 1),
        (RunInterrupted(WRITTEN), 130),
    ],
)
def test_the_cli_prints_its_one_line_messages_as_written(monkeypatch, capsys, error, status):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "run", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit"])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert WRITTEN in err and err.count("\n") == 1, err


def test_a_bad_argument_prints_as_written(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--ckpt_path", "a[b].ckpt", "--output_dir", "out", "--dtype_of", "[x]"])
    assert exit_info.value.code == 2
    assert "[x]" in capsys.readouterr().err


def test_a_missing_checkpoint_named_with_brackets_is_named_as_written(tmp_path, capsys):
    path = tmp_path / "runs" / ":memo:" / "[lora]" / "last.ckpt"
    with pytest.raises(SystemExit):
        cli.main(["export", "--ckpt_path", str(path), "--output_dir", str(tmp_path / "out")])
    assert str(path) in capsys.readouterr().err


def _text(print_with) -> str:
    buffer = io.StringIO()
    print_with(Console(file=buffer, width=400))
    return buffer.getvalue()


def test_summaries_and_tables_print_paths_and_names_as_written():
    manifest = {
        "mode": "sample", "samples": 12, "temperature": 1.0, "complete": True, "bytes": 2**20,
        "bytes_per_token": 40.0, "num_blocks": {"train": 2}, "splits": {"train": {"blocks": 2}},
    }  # fmt: skip
    path = "runs/:memo:/[x]"
    assert path in _text(lambda console: print_cache_summary(manifest, path, console))
    rows = [{"model": "runs/[a]/:memo:/last.ckpt", "ppl": 2.0, "lm_eval": {"[task]": {":memo:": 1.0}}}]
    rows[0] |= {"tokenizer": "tok/[b]", "bpb": 1.5}
    printed = _text(lambda console: print_rows(rows, console))
    assert "runs/[a]/:memo:/last.ckpt" in printed and "[task]" in printed and ":memo:" in printed
    assert "tok/[b]" in printed and "1.5000" in printed
