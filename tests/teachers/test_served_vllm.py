"""Distillation from a REAL vLLM CPU server through the CLI (marked ``served``; the session's one server, see
conftest.py): a few steps of ``distilkit fit`` with ``teacher: {server, model, top_k}`` train as from a top-K
cache of the same model made by transformers; ``distilkit cache --server`` stores what that cache stores; a
server lost mid-run (a proxy in front of it cut) stops the fit with last.ckpt, and the resumed run ends where
an uninterrupted one does."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, tiny_recipe
from served_env import NEEDS_VLLM, SERVED_NAME
from tcp_proxy import TcpProxy

from distilkit.data.teacher_cache import TeacherCache

pytestmark = NEEDS_VLLM
K = 20
QUIET = ("--trainer.enable_progress_bar", "false")


def recipe_for(path: Path, corpus: Path, model_dir: Path, cache_dir: Path, teacher, **trainer) -> Path:
    """The tiny recipe on ``corpus`` in the served model's tokenizer, blocks of 64, forward KL at T = 1."""
    tiny_recipe(path, corpus, model_dir, cache_dir, **trainer)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["teacher"] = teacher
    config["model"]["init_args"]["loss"]["init_args"]["temperature"] = 1.0
    config["data"]["init_args"]["block_size"] = 64
    path.write_text(yaml.safe_dump(config))
    return path


def served(url: str, **settings) -> dict:
    return {"server": url, "model": SERVED_NAME, "top_k": K, **settings}


def validation(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/loss")]
    return [{key: float(row[key]) for key in ("val/loss", "val/kd_loss", "val/ppl")} for row in rows]


def fit(recipe: Path, run_dir: Path, *args: str) -> None:
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir), *QUIET, *args)


def test_a_fit_from_the_server_is_a_fit_from_a_top_k_cache_of_the_same_model(
    tmp_path, small_corpus, cache_dir, vllm_server, vllm_model_dir
):
    """Validation losses of 4 steps from the server equal those from a top-20 cache that transformers made of
    the same model (float32 both, the cache rounds its log-probabilities), and `distilkit cache --server`
    stores the same ids and (within that rounding) the same values as that cache."""
    recipe = recipe_for(tmp_path / "r.yaml", small_corpus, vllm_model_dir, cache_dir, served(vllm_server.url))
    fit(recipe, tmp_path / "served")

    live = ("--model.init_args.teacher", str(vllm_model_dir))
    cache_args = ("--mode", "topk", "--top_k", str(K), *QUIET)
    run_cli(
        "cache", "--config", str(recipe), *live, "--output_dir", str(tmp_path / "live-cache"), *cache_args
    )
    cached = (
        "--model.init_args.teacher",
        "null",
        "--model.init_args.teacher_cache",
        str(tmp_path / "live-cache"),
    )
    fit(recipe, tmp_path / "cached", *cached)
    served_rows, cached_rows = validation(tmp_path / "served"), validation(tmp_path / "cached")
    assert len(served_rows) == 2
    for a, b in zip(served_rows, cached_rows, strict=True):
        assert a == pytest.approx(b, rel=1e-3), (served_rows, cached_rows)

    server_cache = tmp_path / "server-cache"
    run_cli(
        "cache", "--config", str(recipe), "--output_dir", str(server_cache), "--server", vllm_server.url,
        "--model", SERVED_NAME, *cache_args,
    )  # fmt: skip
    theirs, ours = TeacherCache(tmp_path / "live-cache"), TeacherCache(server_cache)
    blocks = list(range(ours.num_blocks("val") - 1))  # the last block's padding is scored apart (masked)
    a, b = theirs.targets("val", blocks), ours.targets("val", blocks)
    same_sets = (a.ids.sort(-1).values == b.ids.sort(-1).values).all(-1).float().mean()
    assert same_sets > 0.9  # a near-tie at the K-th place may differ (this random model's are close)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=0.02, rtol=0)  # descending; each cache rounds


def test_a_server_lost_mid_run_stops_the_fit_and_the_resumed_run_is_exact(
    tmp_path, corpus, cache_dir, vllm_server, vllm_model_dir, capsys
):
    """Through a proxy cut after the probe and 5 batches: exit 1 with one line naming last.ckpt; restored,
    the resumed run ends with the uninterrupted run's weights (vLLM's answers repeat to float rounding)."""
    proxy = TcpProxy(vllm_server.port)
    teacher = served(proxy.url, retry_for_s=2, backoff_s=0.2, max_backoff_s=0.5)
    trainer = {"max_steps": 8, "val_check_interval": 8, "num_sanity_val_steps": 0}
    recipe = recipe_for(tmp_path / "r.yaml", corpus, vllm_model_dir, cache_dir, teacher, **trainer)
    fit(recipe, tmp_path / "straight")

    proxy.completions, proxy.cut_after = 0, 1 + 4 * 5
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exited:
        fit(recipe, stopped)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the data's progress bars)
    last = stopped / "checkpoints" / "last.ckpt"
    assert (
        exited.value.code == 1 and err.startswith("stopped: the teacher server") and f"{last} written" in err
    )
    step = torch.load(last, weights_only=True)["global_step"]
    assert 1 <= step <= 5

    proxy.cut_after = None
    proxy.restore()
    fit(recipe, stopped, "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)
    assert b["global_step"] == 8
    assert max(float((a[key] - b["state_dict"][key]).abs().max()) for key in a) <= 1e-5
    proxy.cut()
