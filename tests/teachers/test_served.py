"""A teacher behind a server as a teacher source (``teacher: {server, model, top_k}``), against the
in-process stand-in for vLLM (``fake_vllm``): its targets, the look-ahead, identity checks, a server lost
mid-run (last.ckpt, then an exact resume), and ``distilkit cache --server``. The real server:
test_served_vllm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fake_vllm import CharTokenizer, FakeVLLM
from helpers import csv_rows, run_cli, tiny_module, tiny_recipe, tiny_trainer
from lightning.pytorch.callbacks import Callback
from transformers import AutoTokenizer

from distilkit.data.read_ahead import ReadAhead
from distilkit.data.teacher_cache import TeacherCache
from distilkit.data.teacher_cache.codec import topk_targets
from distilkit.errors import ConfigError
from distilkit.teachers import open_teacher
from distilkit.teachers.served import ServedTeacherSource

K = 5
QUIET = ("--trainer.enable_progress_bar", "false")


class RunTokenizer:
    """The fake server's ``/tokenize`` with the run's tokenizer (what vLLM serving that tokenizer answers)."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture
def fake(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    server = FakeVLLM(vocab_size=len(tokenizer), tokenizer=RunTokenizer(tokenizer_dir))
    yield server
    server.stop()


def teacher_spec(fake: FakeVLLM, **settings) -> dict:
    return {"server": fake.url, "model": fake.model, "top_k": K, "backoff_s": 0.02, **settings}


def served_recipe(path: Path, corpus, tokenizer_dir, cache_dir, teacher: dict, **trainer) -> Path:
    """The tiny recipe with ``teacher`` (a served teacher's mapping) and forward KL at temperature 1."""
    tiny_recipe(path, corpus, tokenizer_dir, cache_dir, **trainer)
    config = yaml.safe_load(path.read_text())
    model = config["model"]["init_args"]
    model["teacher"] = teacher
    model["loss"]["init_args"]["temperature"] = 1.0
    path.write_text(yaml.safe_dump(config))
    return path


# -------------------------------------------------------------------------------------------- the source
def test_a_served_teacher_mapping_is_a_source_and_loads_no_model(datamodule, fake):
    module = tiny_module(datamodule, teacher=teacher_spec(fake))
    source = module.teacher_source
    assert isinstance(source, ServedTeacherSource) and module.teacher is None
    assert (source.targets, source.temperature, source.full_distribution) == ("topk", 1.0, False)
    assert source.identity() == {"kind": "server", "url": fake.url, "model": "fake", "top_k": K}
    assert not list(source.parameters())


def test_its_chunks_are_the_servers_top_k_targets(datamodule, fake):
    """At the kept positions, the source hands out the cache's own top-k targets of the teacher's logits."""
    source = ServedTeacherSource.from_spec(teacher_spec(fake), datamodule.vocab_size)
    batch = next(iter(datamodule.train_dataloader()))
    keep = batch["labels"][:, 1:] != -100  # (B, T-1)
    chunk = source.teach(batch, "train").at(keep)(slice(0, None))  # (N, K)
    logits = torch.stack([fake.expected(block) for block in batch["input_ids"].tolist()])  # (B, T, V)
    ids, log_probs, tail = topk_targets(logits[:, :-1][keep], K, 1.0)
    assert torch.equal(chunk.ids, ids)
    torch.testing.assert_close(chunk.log_probs, log_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunk.tail, tail, atol=1e-5, rtol=1e-5)
    source.close()


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"server": "http://127.0.0.1:1", "model": "m", "topk": 5}, "model.teacher.topk", "not a setting"),
        ({"server": "http://127.0.0.1:1"}, "model.teacher.model", "is needed"),
        ({"server": "ftp://x", "model": "m"}, "teacher.server", "not an http(s) URL"),
        (
            {"server": "http://127.0.0.1:1", "model": "m", "look_ahead": -1},
            "model.teacher.look_ahead",
            ">= 0",
        ),
    ],
)
def test_bad_settings_are_one_line(spec, field, words):
    with pytest.raises(ConfigError) as caught:
        open_teacher(spec, None, None, 64)
    assert caught.value.field == field and words in str(caught.value)


def test_a_served_teacher_and_a_cache_together_are_refused():
    with pytest.raises(ConfigError, match="model.teacher_cache"):
        open_teacher({"server": "http://127.0.0.1:1", "model": "m"}, None, "some/cache", 64)


def test_packed_conversations_are_refused(fake):
    source = ServedTeacherSource.from_spec(teacher_spec(fake), fake.vocab_size)
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.arange(8)[None]}
    with pytest.raises(ConfigError, match="packs several conversations"):
        source.teach(batch, "train")


# ------------------------------------------------------------------------------------------- look-ahead
def test_read_ahead_reads_depth_batches_before_each_one_is_handed_out():
    read: list[int] = []
    due: list[tuple[int, list[int]]] = []
    loader = ReadAhead(range(6), 2, on_read=read.append, on_yield=lambda b: due.append((b, list(read))))
    assert len(loader) == 6 and loader.start == 0  # the loader's length and attributes
    iterator = iter(loader)
    assert read == []  # nothing is read before the first batch is asked for
    assert list(iterator) == list(range(6))
    assert [seen[-1] for _, seen in due] == [2, 3, 4, 5, 5, 5]  # batch i: i + 2 read already
    assert [b for b, _ in due] == list(range(6))


class InFlight(Callback):
    """Records, at each training step, how many batches the source holds sent (the current one included)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts.append(len(pl_module.teacher_source._queues["train"].entries))


@pytest.mark.parametrize("look_ahead", [0, 2])
def test_the_next_batches_are_sent_while_one_trains(tmp_path, datamodule, fake, look_ahead):
    """With a data module, each step starts with its own batch answered and ``look_ahead`` more sent; the
    answers are the same with and without the look-ahead."""
    module = tiny_module(datamodule, teacher=teacher_spec(fake, look_ahead=look_ahead))
    seen = InFlight()
    tiny_trainer(tmp_path, max_steps=5, callbacks=[seen], limit_val_batches=0).fit(module, datamodule)
    assert seen.counts == [1 + look_ahead] * 5
    assert module.teacher_source.waits["train"].batches == 5
    assert fake.completions == 1 + 4 * (5 + look_ahead)  # the probe, then 4 blocks a batch


# -------------------------------------------------------------------------------------- runs and faults
def test_a_recipe_trains_from_the_server(tmp_path, corpus, tokenizer_dir, cache_dir, fake):
    recipe = served_recipe(tmp_path / "r.yaml", corpus, tokenizer_dir, cache_dir, teacher_spec(fake))
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert not any(key.startswith("teacher") for key in checkpoint["state_dict"])
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val/kd_loss" in header and "val/teacher_ppl" not in header


def test_a_server_absent_at_start_is_one_line_naming_it(
    tmp_path, corpus, tokenizer_dir, cache_dir, fake, capsys
):
    url = fake.url
    fake.stop()
    recipe = served_recipe(tmp_path / "r.yaml", corpus, tokenizer_dir, cache_dir, teacher_spec(fake))
    with pytest.raises(SystemExit) as exited:
        run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET)
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and url in err and "does not answer" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_another_tokenizer_is_refused_before_the_first_step(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    other = FakeVLLM(
        vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), tokenizer=CharTokenizer(512)
    )
    recipe = served_recipe(tmp_path / "r.yaml", corpus, tokenizer_dir, cache_dir, teacher_spec(other))
    with pytest.raises(SystemExit) as exited:
        run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET)
    other.stop()
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "tokenizes the probe text" in err and "\n" not in err, err
    assert other.completions == 0  # nothing was scored


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "val_check_interval", "fail_after"),
    [
        ("a training batch", 8, 1 + 4 * 5),  # the probe and 5 batches of 4 blocks, then only HTTP 500
        ("the validation", 4, 1 + 4 * (4 + 2) + 4),  # 4 batches and 2 read ahead, then validation batch 1
    ],
)
def test_a_server_lost_mid_run_writes_last_ckpt_and_the_resumed_run_is_exact(
    tmp_path, corpus, tokenizer_dir, cache_dir, fake, capsys, where, val_check_interval, fail_after
):
    """The server fails for longer than the retry window: one line, exit 1, last.ckpt of the last finished
    step; resumed once it answers again, the run ends with the uninterrupted run's weights and metrics.csv
    (a validation the failure cut short is run again)."""
    teacher = teacher_spec(fake, retry_for_s=0.3, max_backoff_s=0.1)
    trainer = {"max_steps": 8, "val_check_interval": val_check_interval, "num_sanity_val_steps": 0}
    recipe = served_recipe(tmp_path / "r.yaml", corpus, tokenizer_dir, cache_dir, teacher, **trainer)
    fit = ("fit", "--config", str(recipe), *QUIET)
    run_cli(*fit, "--trainer.default_root_dir", str(tmp_path / "straight"))

    fake.completions, fake.fail_after = 0, fail_after
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exited:
        run_cli(*fit, "--trainer.default_root_dir", str(stopped))
    err = capsys.readouterr().err.strip()
    last = stopped / "checkpoints" / "last.ckpt"
    step = 5 if where == "a training batch" else 4
    assert exited.value.code == 1 and "\n" not in err, err
    assert fake.url in err and "tries over" in err and f"{last} written at step {step}" in err, err
    assert torch.load(last, weights_only=True)["global_step"] == step

    fake.fail_after = None
    run_cli(*fit, "--trainer.default_root_dir", str(stopped), "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert b["global_step"] == 8
    assert max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]) <= 1e-6
    assert csv_rows(stopped) == csv_rows(tmp_path / "straight")


# ---------------------------------------------------------------------------------- distilkit cache --server
def served_cache(recipe: Path, output_dir: Path, fake: FakeVLLM, *args: str) -> Path:
    run_cli(
        "cache", "--config", str(recipe), "--output_dir", str(output_dir), "--server", fake.url,
        "--model", fake.model, "--top_k", str(K), *QUIET, *args,
    )  # fmt: skip
    return output_dir


@pytest.mark.slow
def test_cache_from_a_server_resumes_and_trains_as_the_server(
    tmp_path, small_corpus, tokenizer_dir, cache_dir, fake, capsys
):
    """`distilkit cache --server` stores the server's top-K answers; a run stopped by a failing server keeps
    its finished shards and the same command completes them; training from the cache matches training from
    the server (up to the cache's rounding)."""
    teacher = teacher_spec(fake, retry_for_s=0.3, max_backoff_s=0.1)
    recipe = served_recipe(tmp_path / "r.yaml", small_corpus, tokenizer_dir, cache_dir, teacher)
    whole = served_cache(recipe, tmp_path / "whole", fake, "--shard_blocks", "8")
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["complete"] and manifest["top_k"] == K and manifest["temperature"] == 1.0
    assert manifest["identity"]["teacher"] == {"kind": "server", "url": fake.url, "model": "fake", "top_k": K}
    blocks = sum(manifest["num_blocks"].values())

    fake.completions, fake.fail_after = 0, 1 + 20
    with pytest.raises(SystemExit) as exited:
        served_cache(recipe, tmp_path / "resumed", fake, "--shard_blocks", "8")
    assert exited.value.code == 1 and "tries over" in capsys.readouterr().err
    fake.completions, fake.fail_after = 0, None
    served_cache(recipe, tmp_path / "resumed", fake, "--shard_blocks", "8")
    assert fake.completions < blocks  # the blocks on disk were not scored again
    a, b = TeacherCache(whole), TeacherCache(tmp_path / "resumed")
    for split in ("train", "val"):
        every = list(range(a.num_blocks(split)))
        for name, array in a.read(split, every).arrays().items():
            assert (array == b.read(split, every).arrays()[name]).all(), (split, name)

    losses = {}
    for name, teacher_args in {
        "server": (),
        "cache": ("--model.init_args.teacher", "null", "--model.init_args.teacher_cache", str(whole)),
    }.items():
        root = tmp_path / f"fit-{name}"
        run_cli(
            "fit", "--config", str(recipe), "--trainer.default_root_dir", str(root), *QUIET, *teacher_args
        )
        rows = [line.split(",") for line in (root / "metrics.csv").read_text().splitlines()]
        column = rows[0].index("val/kd_loss")
        losses[name] = [float(row[column]) for row in rows[1:] if row[column]]
    assert len(losses["server"]) == 2
    assert losses["server"] == pytest.approx(losses["cache"], rel=2e-3), losses
