"""Training from an offline teacher cache (CachedTeacher): with K = V the module's loss and gradients are live
forward KL's; validation logs what the cache determines and nothing else."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import tiny_module

from distilkit import TextDataModule
from distilkit.commands.cache import CacheOptions, write_teacher_cache
from distilkit.data.teacher_cache import TeacherCache
from distilkit.errors import ConfigError
from distilkit.losses import ForwardKLLoss, GeneralizedJSDLoss, ReverseKLLoss


@pytest.fixture(scope="module")
def data(small_corpus: Path, tokenizer_dir: Path, cache_dir: Path) -> TextDataModule:
    dm = TextDataModule(
        str(small_corpus), tokenizer=str(tokenizer_dir), block_size=32, batch_size=4, val_fraction=0.25,
        cache_dir=str(cache_dir),
    )  # fmt: skip
    dm.setup()
    return dm


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.fixture(scope="module")
def live(data):
    """A tiny live-KD module (forward KL at T = 2) whose teacher is sharpened so that KD is a few nats."""
    torch.manual_seed(0)
    module = tiny_module(data, loss=ForwardKLLoss(temperature=2.0))
    with torch.no_grad():
        module.teacher.get_output_embeddings().weight.mul_(8.0)  # (tied) wider logits: a peaked teacher
    return module


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, live, data) -> Path:
    """Every entry of the teacher's distribution (K = V), written by the cache command's predict loop."""
    directory = tmp_path_factory.mktemp("full") / "cache"
    write_teacher_cache(quiet_trainer(), live, data, CacheOptions(str(directory), top_k=data.vocab_size))
    return directory


def from_cache(live, data, directory: Path, loss=None):
    """A module with the live module's student weights that trains from the cache instead of the teacher."""
    module = tiny_module(
        data, teacher=None, teacher_cache=str(directory), loss=loss or ForwardKLLoss(temperature=2.0)
    )
    module.student.load_state_dict(live.student.state_dict())
    return module


def test_a_cache_with_k_equal_to_v_gives_the_live_forward_kl_loss_and_gradients(live, data, full_cache):
    cached = from_cache(live, data, full_cache)
    batch = next(iter(data.train_dataloader()))
    results = []
    for module in (live, cached):
        module.train()  # train mode: the training blocks of the cache
        module.student.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both students
        losses = module.compute_loss(batch)
        losses["loss"].backward()
        grads = {name: p.grad.clone() for name, p in module.student.named_parameters()}
        results.append((losses, grads))
    (live_losses, live_grads), (cached_losses, cached_grads) = results
    assert float(live_losses["kd_loss"]) > 0.5, "a teacher sharp enough for the comparison to mean something"
    # the cache decodes each log-probability within step / 2 (at most 0.02 nats; here far less)
    for name in ("loss", "ce_loss", "kd_loss"):
        torch.testing.assert_close(cached_losses[name], live_losses[name], rtol=2e-3, atol=1e-4, msg=name)
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=2e-2, atol=2e-4, msg=name)


def test_validation_from_a_cache_logs_what_its_targets_determine(live, data, full_cache):
    cached = from_cache(live, data, full_cache)
    live_metrics = quiet_trainer().validate(live, data, verbose=False)[0]
    cached_metrics = quiet_trainer().validate(cached, data, verbose=False)[0]
    not_from_it = {"val/teacher_ppl", "val/teacher_bpb", "val/kl"}
    assert set(live_metrics) - set(cached_metrics) == not_from_it, "not computable from it"
    for name in ("val/ppl", "val/bpb", "val/ce_loss", "val/kd_loss", "val/top1_agreement"):
        assert cached_metrics[name] == pytest.approx(live_metrics[name], rel=2e-3), name


def test_a_sampled_cache_trains_forward_kl_and_refuses_other_losses(tmp_path, live, data):
    directory = tmp_path / "sampled"
    write_teacher_cache(quiet_trainer(), live, data, CacheOptions(str(directory), mode="sample", samples=4))
    assert TeacherCache(directory).mode == "sample"
    cached = from_cache(live, data, directory)
    metrics = quiet_trainer().validate(cached, data, verbose=False)[0]
    assert {"val/ppl", "val/ce_loss", "val/kd_loss"} <= set(metrics) and "val/top1_agreement" not in metrics
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(cached, data)
    assert trainer.global_step == 2
    reverse = from_cache(live, data, directory, loss=ReverseKLLoss(temperature=2.0))
    with pytest.raises(ConfigError, match="cannot be computed from sample targets"):
        quiet_trainer().validate(reverse, data, verbose=False)


@pytest.mark.slow
def test_a_cache_with_tail_draws_trains_every_loss_and_the_sampled_one_the_jsd(tmp_path, live, data):
    """Top-k with tail draws: forward KL and the generalized JSD use the draws (the estimate), the reverse KL
    the (K+1) buckets, top-1 agreement is logged; a sampled cache trains the generalized JSD too."""
    directory = tmp_path / "tail"
    write_teacher_cache(quiet_trainer(), live, data, CacheOptions(str(directory), top_k=8, tail_samples=8))
    assert TeacherCache(directory).tail_samples == 8
    for loss in (ForwardKLLoss(2.0), GeneralizedJSDLoss(0.5, temperature=2.0), ReverseKLLoss(2.0)):
        cached = from_cache(live, data, directory, loss=loss)
        metrics = quiet_trainer(limit_val_batches=2).validate(cached, data, verbose=False)[0]
        assert {"val/ppl", "val/kd_loss", "val/top1_agreement"} <= set(metrics), type(loss).__name__
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(from_cache(live, data, directory), data)
    assert trainer.global_step == 2
    sampled = tmp_path / "sampled"
    write_teacher_cache(quiet_trainer(), live, data, CacheOptions(str(sampled), mode="sample", samples=4))
    jsd = from_cache(live, data, sampled, loss=GeneralizedJSDLoss(0.5, temperature=2.0))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(jsd, data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/kd_loss"])


def test_batches_without_block_indices_and_predict_files_are_refused(live, data, full_cache, small_corpus):
    cached = from_cache(live, data, full_cache)
    batch = {k: v for k, v in next(iter(data.val_dataloader())).items() if k != "block_index"}
    with pytest.raises(ConfigError, match="block_index"):
        cached.eval().compute_loss(batch)
    other = TextDataModule(
        str(small_corpus), predict_files=str(small_corpus), tokenizer=data.tokenizer.name_or_path,
        block_size=32, batch_size=4, val_fraction=0.25, cache_dir=str(data.cache_dir),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="are not in the teacher cache"):
        quiet_trainer().predict(cached, other)
    assert len(quiet_trainer().predict(cached, data)) > 0, "the validation blocks (no predict_files) are"
    tested = TextDataModule(
        str(small_corpus), test_files=str(small_corpus), tokenizer=data.tokenizer.name_or_path,
        block_size=32, batch_size=4, val_fraction=0.25, cache_dir=str(data.cache_dir),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="data.test_files.*are not in the teacher cache"):
        quiet_trainer().test(cached, tested, verbose=False)  # their block indices are not validation blocks


def test_a_cache_made_with_another_tokenizer_is_refused_saying_why(live, data, full_cache, small_corpus):
    """Issue 23: a cache holds targets at the positions of its own blocks; a student with another tokenizer
    is refused, naming the live teacher and a cross-tokenizer loss as the way."""
    other = TextDataModule(
        str(small_corpus), tokenizer={"vocab_size": 400, "style": "sentencepiece"}, block_size=32,
        batch_size=4, val_fraction=0.25, cache_dir=str(data.cache_dir),
    )  # fmt: skip
    module = tiny_module(
        other, teacher=None, teacher_cache=str(full_cache), loss=ForwardKLLoss(temperature=2.0)
    )
    with pytest.raises(ConfigError, match=r"made with another tokenizer than data.tokenizer.*live teacher"):
        quiet_trainer().validate(module, other, verbose=False)
