"""`distilkit predict` and `validate` on a finished run: per-document jsonl, and the run's files untouched."""

from __future__ import annotations

import csv
import json
import math

import pytest
from helpers import fit_run, run_cli, tiny_recipe


def _files(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_predict_writes_per_document_nll_that_matches_validation(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, limit_val_batches=None)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    before = _files(run_dir)
    common = ["--config", str(recipe), "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last"]
    run_cli("predict", *common)
    run_cli("validate", *common)
    assert _files(run_dir).items() >= before.items(), "an evaluation changed the run's own files"

    rows = [json.loads(line) for line in (run_dir / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert rows and [r["document"] for r in rows] == sorted({r["document"] for r in rows})
    assert all(
        r["tokens"] > 0 and math.isfinite(r["nll"]) and r["ppl"] == pytest.approx(math.exp(r["nll"]))
        for r in rows
    )
    assert all("teacher_nll" in r and "teacher_ppl" in r for r in rows)
    with open(run_dir / "validate" / "metrics.csv", newline="") as file:
        validated = [row for row in csv.DictReader(file) if row.get("val/ppl")]
    tokens = sum(r["tokens"] for r in rows)
    for model, column in (("nll", "val/ppl"), ("teacher_nll", "val/teacher_ppl")):
        pooled = math.exp(sum(r[model] * r["tokens"] for r in rows) / tokens)
        assert pooled == pytest.approx(float(validated[-1][column]), rel=1e-4)
    assert "predictions.jsonl" in capsys.readouterr().out

    run_cli("predict", *common)  # a second evaluation goes beside the first
    assert (run_dir / "predict-2" / "predictions.jsonl").is_file()


def test_predict_files_score_other_text_by_document(tmp_path, corpus, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    texts = tmp_path / "three.jsonl"
    texts.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["def f(): pass", "x = 1 " * 30, "The end."])
    )
    run_cli(
        "predict",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(run_dir),
        "--ckpt_path",
        "last",
        "--data.init_args.predict_files",
        str(texts),
    )
    rows = [json.loads(line) for line in (run_dir / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert [r["document"] for r in rows] == [0, 1, 2]
    assert rows[1]["tokens"] > rows[0]["tokens"] and rows[1]["tokens"] > rows[2]["tokens"]
