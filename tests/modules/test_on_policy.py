"""OnPolicyDistillationModule: the loss on sampled positions only, lmbda 0 is today's module, seeded and
resumable sampling, a frozen teacher, the mixed sampler's top-K, logs, and DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import ROOT, make_datamodule, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import distilkit.modules.on_policy
from distilkit import DistillationModule, GeneralizedJSDLoss, OnPolicyDistillationModule
from distilkit.batch import IGNORE_INDEX
from distilkit.errors import ConfigError
from distilkit.modules.on_policy import training_batch

SMALL = {"prompt_tokens": 6, "max_new_tokens": 10, "val_samples": 4}


def on_policy_module(datamodule, **kwargs):
    return tiny_module(datamodule, cls=OnPolicyDistillationModule, **{**SMALL, **kwargs})


def first_batch(datamodule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in next(iter(datamodule.train_dataloader())).items()}


class Recorder(Callback):
    """Per training step: the logged values of ``names`` and whether the teacher was in training mode.
    (Read at the next step's start: the module's own ``on_train_batch_end`` runs after the callbacks'.)"""

    def __init__(self, *names: str) -> None:
        self.names, self.rows = names, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.append({"teacher_training": pl_module.teacher.training})
        self._read(trainer, -2)

    def on_train_end(self, trainer, pl_module) -> None:
        self._read(trainer, -1)

    def _read(self, trainer, index: int) -> None:
        if len(self.rows) >= -index:
            metrics = trainer.callback_metrics
            self.rows[index] |= {name: float(metrics[name]) for name in self.names if name in metrics}


def test_the_loss_covers_exactly_the_sampled_positions(datamodule):
    module = on_policy_module(datamodule, seed=0).eval()  # eval: no dropout in the comparison below
    batch = first_batch(datamodule)
    batch["attention_mask"][1, 4:] = 0  # row 1 as a split's last block: 4 real tokens, then padding
    batch["labels"][1, 4:] = IGNORE_INDEX
    module.eos_token_id = None
    free = module.sample(batch, module.sampling_generator("test")).new_tokens  # (B, 10), no EOS
    eos = int(free[0, 3])
    module.eos_token_id = eos  # row 0 now ends at its first `eos`; the draws before it are the same
    trained = training_batch(module.sample(batch, module.sampling_generator("test")))

    positions, expected_labels = [], torch.full_like(trained["labels"], IGNORE_INDEX)
    for row in range(free.shape[0]):
        prompt = 4 if row == 1 else 6
        hits = (free[row] == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else free.shape[1]  # up to and including the EOS
        assert torch.equal(trained["input_ids"][row, :prompt], batch["input_ids"][row, :prompt])
        expected_labels[row, prompt : prompt + length] = free[row, :length]
        positions += [(row, t) for t in range(prompt - 1, prompt + length - 1)]  # predict sampled tokens
    assert torch.equal(trained["labels"], expected_labels)
    assert (expected_labels[0] != IGNORE_INDEX).sum() < 10, "row 0 stopped at its EOS"

    rows, cols = (torch.tensor(x) for x in zip(*positions, strict=True))
    ids, mask = trained["input_ids"], trained["attention_mask"]
    with torch.no_grad():
        student = module.student(input_ids=ids, attention_mask=mask).logits[rows, cols]  # (N, V)
        teacher = module.teacher(input_ids=ids, attention_mask=mask).logits[rows, cols]  # (N, V)
        kd = module.compute_loss(trained)["kd_loss"]
    torch.testing.assert_close(kd, module.loss(student, teacher), rtol=1e-5, atol=1e-6)


def test_a_sampled_step_leaves_the_next_data_step_as_it_was(datamodule):
    """Sampling and training on the samples changes nothing a later data step sees but the weights: every
    module's train/eval mode, the global RNG (dropout), the data batch; the data step's loss and gradient
    are the same before and after it (dropout on, weights held fixed)."""
    module = on_policy_module(datamodule, seed=0, lmbda=0.5).train()
    batch = first_batch(datamodule)
    original = {k: v.clone() for k, v in batch.items()}
    modes = {name: m.training for name, m in module.named_modules()}

    def data_step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.student.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks for both calls
        loss = module.compute_loss(batch)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.student.parameters()]

    loss, grads = data_step()
    rng = torch.get_rng_state()
    sampled = training_batch(module.sample(batch, module.sampling_generator("sample", 0, 0)))
    assert torch.equal(torch.get_rng_state(), rng), "sampling drew from the global RNG"
    weights = module.sampled_weights()  # a sampled step's: the divergence alone
    module.compute_loss(sampled, weights=weights)["loss"].backward()  # its gradient (not applied)
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert all(torch.equal(batch[k], original[k]) for k in original)
    again, grads_again = data_step()
    assert torch.equal(again, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))


def _fit(module, datamodule, tmp_path, steps: int, ckpt_path=None, callbacks=(), **kwargs):
    recorder = Recorder("train/loss", "train/on_policy", "train/generation_share")
    options = {"val_check_interval": 2, "limit_val_batches": 1, **kwargs}
    trainer = tiny_trainer(tmp_path, max_steps=steps, callbacks=[recorder, *callbacks], **options)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, recorder.rows


def test_lmbda_zero_trains_exactly_as_the_distillation_module(corpus, tokenizer_dir, cache_dir, tmp_path):
    """Same losses and weights, though validation samples in between (dropout on: the global RNG is
    left alone)."""
    runs = []
    for cls, extra in ((DistillationModule, {}), (OnPolicyDistillationModule, {"lmbda": 0.0, **SMALL})):
        L.seed_everything(0)
        datamodule = make_datamodule(corpus, tokenizer_dir, cache_dir)
        module = tiny_module(datamodule, cls=cls, loss=GeneralizedJSDLoss(beta=0.5), **extra)
        trainer, rows = _fit(module, datamodule, tmp_path / cls.__name__, steps=4)
        runs.append((module, rows, trainer.callback_metrics))
    (parent, parent_rows, _), (child, child_rows, metrics) = runs
    assert [r["train/loss"] for r in child_rows] == [r["train/loss"] for r in parent_rows]
    assert [r["train/on_policy"] for r in child_rows] == [0.0] * 4
    assert "val/sample_teacher_nll" in metrics and "val/sample_distinct2" in metrics
    for key, value in parent.student.state_dict().items():
        assert torch.equal(child.student.state_dict()[key], value), key


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(datamodule, monkeypatch):
    module = on_policy_module(datamodule, seed=3, lmbda=0.5)
    batch = first_batch(datamodule)
    before = torch.get_rng_state()
    a = module.sample(batch, module.sampling_generator("sample", 5, 0)).tokens
    b = module.sample(batch, module.sampling_generator("sample", 5, 0)).tokens
    c = module.sample(batch, module.sampling_generator("sample", 6, 0)).tokens
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)

    decisions = [module.is_on_policy(step) for step in range(2000)]
    assert 0.45 < sum(decisions) / len(decisions) < 0.55
    module.seed = 4
    assert [module.is_on_policy(step) for step in range(2000)] != decisions
    module.seed = None  # then the run's seed (`seed_everything` sets PL_GLOBAL_SEED)
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    assert [module.is_on_policy(step) for step in range(2000)] == decisions
    module.apply_knobs({"lmbda": 0.0})  # a curriculum knob
    assert "lmbda" in module.knob_names() and not any(module.is_on_policy(s) for s in range(200))
    module.apply_knobs({"lmbda": 1.0})
    assert all(module.is_on_policy(s) for s in range(200))
    module.off_policy_steps = 5  # a warm-up on the data, then lmbda
    assert [module.is_on_policy(s) for s in range(8)] == [False] * 5 + [True] * 3


def test_a_resumed_run_samples_and_ends_as_the_uninterrupted_one(
    corpus, tokenizer_dir, cache_dir, tmp_path, monkeypatch
):
    """lmbda 0.5, seed 0: steps 1 and 2 sample, 0 and 3 do not. Also: the teacher never trains, the logs,
    the W&B samples table."""
    tables = []

    class FakeWandb:
        def log_table(self, key, columns, data):
            tables.append((key, columns, [list(row) for row in data]))

    monkeypatch.setattr(distilkit.modules.on_policy, "wandb_loggers", lambda trainer: [FakeWandb()])
    L.seed_everything(0)
    datamodule = make_datamodule(corpus, tokenizer_dir, cache_dir)
    module = on_policy_module(datamodule, seed=0, lmbda=0.5)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer, rows = _fit(module, datamodule, tmp_path / "whole", steps=4)
    assert [r["train/on_policy"] for r in rows] == [0.0, 1.0, 1.0, 0.0]
    shares = [r["train/generation_share"] for r in rows]
    assert shares[0] == shares[3] == 0.0 and all(0.0 < s < 1.0 for s in shares[1:3])
    assert all(not r["teacher_training"] for r in rows)
    assert all(not p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"the teacher changed: {key}"
    assert tables and tables[-1][0] == "on_policy_samples" and tables[-1][1] == ["step", "prompt", "sample"]
    rows_logged = tables[-1][2]  # 4 rows (TABLE_ROWS) at each validation: steps 2 and 4
    assert [row[0] for row in rows_logged] == [2] * 4 + [4] * 4 and all(
        row[1] and row[2] for row in rows_logged
    )

    L.seed_everything(0)
    data = make_datamodule(corpus, tokenizer_dir, cache_dir)
    first = on_policy_module(data, seed=0, lmbda=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "half", save_last=True, every_n_train_steps=1)
    _fit(first, data, tmp_path / "half", steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    saved = torch.load(tmp_path / "half" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and not any(key.startswith("teacher.") for key in saved["state_dict"])
    L.seed_everything(0)  # the same random teacher (a real one is loaded; checkpoints never hold it)
    data = make_datamodule(corpus, tokenizer_dir, cache_dir)
    resumed = on_policy_module(data, seed=0, lmbda=0.5)
    _, resumed_rows = _fit(resumed, data, tmp_path / "rest", 4, ckpt_path=tmp_path / "half" / "last.ckpt")
    assert [r["train/loss"] for r in resumed_rows] == [r["train/loss"] for r in rows[2:]]
    for key, value in module.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key


def test_the_mixed_sampler_keeps_only_student_tokens_in_the_teachers_top_k(datamodule, tmp_path):
    module = on_policy_module(datamodule, lmbda=1.0, sampler="mixed", referee_top_k=3, seed=0)
    seen = []
    sample = module.sample
    module.sample = lambda *args, **kwargs: seen.append(sample(*args, **kwargs)) or seen[-1]  # type: ignore[method-assign]
    _fit(module, datamodule, tmp_path, steps=1, limit_val_batches=0)
    (sampled,) = seen  # the one training step's sample (full prompts: no padding)
    kept, generated = sampled.proposal_kept, sampled.generated_mask
    assert kept is not None and kept.any() and (generated & ~kept).any()
    with torch.no_grad():
        logits = module.teacher(input_ids=sampled.tokens).logits[:, :-1]  # (B, L-1, V) predicts t+1
    token_logit = logits.gather(2, sampled.tokens[:, 1:, None]).squeeze(2)  # (B, L-1)
    kth = logits.topk(3, dim=-1).values[..., -1]  # (B, L-1)
    assert (token_logit >= kth)[kept[:, 1:]].all(), "a kept proposal lies outside the teacher's top-3"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lmbda": 1.5}, "model.lmbda"),
        ({"off_policy_steps": -1}, "model.off_policy_steps"),
        ({"sampler": "beam"}, "model.sampler"),
        ({"prompt_tokens": 0}, "model.prompt_tokens"),
        ({"prompt_tokens": 32}, "model.prompt_tokens"),  # the whole block of 32
        ({"temperature": 0.0}, "model.temperature"),
        ({"teacher": None}, "model.teacher"),
    ],
)
def test_bad_settings_name_the_field(datamodule, kwargs, field):
    with pytest.raises(ConfigError) as error:
        on_policy_module(datamodule, **kwargs)
    assert error.value.field == field


@pytest.mark.slow
def test_the_recipe_runs_under_ddp_on_two_processes(tmp_path, cache_dir):
    """recipes/on_policy.yaml cut to 3 steps (every one sampled) on 2 CPU processes; each samples its own
    share of the validation prompts."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "distilkit.cli", "fit", "--config", str(ROOT / "recipes/on_policy.yaml")]
    command += ["--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "3"]
    command += ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2"]
    command += ["--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    command += ["--trainer.strategy", "ddp", "--data.init_args.batch_size", "2"]
    command += ["--data.init_args.cache_dir", str(cache_dir), "--model.init_args.lmbda", "1.0"]
    command += ["--model.init_args.off_policy_steps", "0"]  # the recipe's warm-up is 200 steps
    command += ["--model.init_args.lr_scheduler.init_args.total_steps", "3"]
    command += ["--model.init_args.max_new_tokens", "16", "--model.init_args.val_samples", "4"]
    result = subprocess.run(command, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    steps = {r["step"]: float(r["train/on_policy"]) for r in rows if r.get("train/on_policy")}  # by step:
    assert steps == {"0": 1.0, "1": 1.0, "2": 1.0}  # the last step's row can be written twice at the end
    (val,) = [r for r in rows if r.get("val/sample_teacher_nll")]
    assert float(val["val/sample_teacher_nll"]) > 0 and 0 < float(val["val/sample_distinct2"]) <= 1
    saved = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in saved["state_dict"])
