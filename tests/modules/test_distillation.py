"""DistillationModule: the frozen teacher, modes, the loss, no-teacher training, chunked = unchunked."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_STUDENT, TINY_TEACHER, tiny_module, tiny_trainer

from distilkit import DistillationModule, ForwardKLLoss, GeneralizedJSDLoss
from distilkit.errors import ConfigError


def _teacher_state(module):
    return {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}


def test_teacher_is_frozen_unchanged_and_outside_optimizer_and_checkpoint(datamodule, tmp_path):
    module = tiny_module(datamodule)
    before = _teacher_state(module)
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_steps=5, enable_checkpointing=True)
    trainer.fit(module, datamodule)

    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the teacher changed"
    assert not any(
        torch.equal(student_before[k], v)
        for k, v in module.student.state_dict().items()
        if v.dtype.is_floating_point and v.numel() > 1 and "bias" not in k
    )
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert all(not p.requires_grad for p in module.teacher.parameters())

    ckpt_path = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(ckpt_path, weights_only=True)
    assert checkpoint["state_dict"] and not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])

    restored = tiny_module(datamodule)
    restored.load_state_dict(checkpoint["state_dict"])  # strict: the teacher keeps its own weights
    for key, value in module.student.state_dict().items():
        assert torch.equal(restored.student.state_dict()[key], value)


class ModeRecorder(DistillationModule):
    """Records the modes of teacher and student at every step (also shows subclassing)."""

    modes: list[tuple[str, bool, bool]]

    def training_step(self, batch, batch_idx):
        self.modes.append(("train", self.student.training, self.teacher.training))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.modes.append(("val", self.student.training, self.teacher.training))
        return super().validation_step(batch, batch_idx)


def test_teacher_in_eval_and_student_in_train_at_every_step(datamodule, tmp_path):
    module = tiny_module(datamodule, cls=ModeRecorder)
    module.modes = []
    tiny_trainer(tmp_path, max_steps=6, val_check_interval=2, num_sanity_val_steps=1).fit(module, datamodule)
    train_modes = [m for m in module.modes if m[0] == "train"]
    val_modes = [m for m in module.modes if m[0] == "val"]
    assert len(train_modes) == 6 and len(val_modes) >= 4
    assert all(student and not teacher for _, student, teacher in train_modes)
    assert all(not student and not teacher for _, student, teacher in val_modes)
    module.train()
    assert not module.teacher.training


def test_the_kd_loss_falls(datamodule, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(datamodule, kd_ratio=1.0, loss=ForwardKLLoss(temperature=2.0))
    batch = next(iter(datamodule.train_dataloader()))
    first = module.compute_loss(batch)["kd_loss"].item()
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        module.compute_loss(batch)["loss"].backward()
        optimizer.step()
    last = module.compute_loss(batch)["kd_loss"].item()
    assert last < 0.5 * first


def test_total_is_the_kd_ratio_mix_of_ce_and_kd(datamodule):
    module = tiny_module(datamodule, kd_ratio=0.25)
    batch = next(iter(datamodule.train_dataloader()))
    losses = module.compute_loss(batch)
    torch.testing.assert_close(losses["loss"], 0.75 * losses["ce_loss"] + 0.25 * losses["kd_loss"])


def test_no_teacher_is_plain_language_model_training(datamodule, tmp_path):
    module = tiny_module(datamodule, teacher=None).eval()  # no dropout: two forwards must agree
    batch = next(iter(datamodule.train_dataloader()))
    losses = module.compute_loss(batch)
    assert set(losses) == {"loss", "ce_loss"}
    reference = module.student(
        input_ids=batch["input_ids"], labels=batch["labels"]
    ).loss  # transformers' own CE
    torch.testing.assert_close(losses["loss"], reference, rtol=1e-5, atol=1e-5)
    trainer = tiny_trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(module, datamodule)
    assert "val/ppl" in trainer.callback_metrics and "val/teacher_ppl" not in trainer.callback_metrics


def test_validation_logs_the_design_names(datamodule, tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(tiny_module(datamodule), datamodule)
    expected = {
        "train/loss",
        "train/ce_loss",
        "train/kd_loss",
        "train/lr",
        "val/loss",
        "val/ce_loss",
        "val/kd_loss",
        "val/ppl",
        "val/teacher_ppl",
        "val/top1_agreement",
    }
    assert expected <= set(trainer.callback_metrics)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/ppl"], metrics["val/ce_loss"].exp(), rtol=1e-4, atol=1e-4)


def _loss_and_grads(module, batch):
    module.zero_grad()
    losses = module.compute_loss(batch)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 10_000])
@pytest.mark.parametrize("loss", [ForwardKLLoss(temperature=2.0), GeneralizedJSDLoss(beta=0.3)])
def test_chunked_equals_unchunked(datamodule, chunk_size, loss):
    torch.manual_seed(0)
    module = tiny_module(datamodule, loss=loss, chunk_size=None).eval()  # eval: no dropout between the runs
    batch = next(iter(datamodule.train_dataloader()))
    batch = {k: v[:, :29] for k, v in batch.items() if k != "block_index"}  # 4 x 28 targets
    batch["labels"][0, 5:9] = -100
    reference, reference_grads = _loss_and_grads(module, batch)
    module.chunk_size = chunk_size
    chunked, chunked_grads = _loss_and_grads(module, batch)
    for key in reference:
        torch.testing.assert_close(chunked[key], reference[key], rtol=1e-4, atol=1e-6)
    assert reference_grads.keys() == chunked_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_chunked_handles_a_vocabulary_the_chunk_does_not_divide(datamodule):
    """Vocabulary 512 from the tokenizer, student padded to 517 rows: chunk 6 divides neither."""
    student = {**TINY_STUDENT, "vocab_size": 517}
    teacher = {**TINY_TEACHER, "vocab_size": 515}
    module = tiny_module(datamodule, student=student, teacher=teacher, chunk_size=None).eval()
    batch = next(iter(datamodule.train_dataloader()))
    reference, reference_grads = _loss_and_grads(module, batch)
    module.chunk_size = 6
    chunked, chunked_grads = _loss_and_grads(module, batch)
    torch.testing.assert_close(chunked["loss"], reference["loss"], rtol=1e-4, atol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_all_positions_masked_gives_zero_with_a_gradient_path(datamodule):
    module = tiny_module(datamodule, chunk_size=8)
    batch = dict(next(iter(datamodule.train_dataloader())))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    losses = module.compute_loss(batch)
    assert losses["loss"].item() == 0.0
    losses["loss"].backward()


def test_forward_returns_student_logits(datamodule):
    module = tiny_module(datamodule).eval()
    ids = torch.randint(0, datamodule.vocab_size, (2, 10))
    torch.testing.assert_close(module(ids), module.student(input_ids=ids).logits)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"kd_ratio": 1.5}, "model.kd_ratio"),
        ({"kd_ratio": -0.1}, "model.kd_ratio"),
        ({"chunk_size": 0}, "model.chunk_size"),
        ({"teacher_dtype": "fp8"}, "model.teacher_dtype"),
    ],
)
def test_bad_settings_name_the_field(datamodule, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_module(datamodule, **kwargs)


def test_bfloat16_teacher_and_mixed_precision_keep_the_student_float32(datamodule, tmp_path):
    module = tiny_module(datamodule, teacher_dtype="bfloat16")
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    trainer = tiny_trainer(tmp_path, max_steps=2, precision="bf16-mixed", val_check_interval=2)
    trainer.fit(module, datamodule)
    assert next(module.student.parameters()).dtype == torch.float32
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.slow
def test_compiled_loss_equals_eager_and_compiles_once(datamodule):
    """compile_loss compiles the per-chunk terms with torch.compile: the numbers must not change, and chunks
    of other sizes (the last of a batch, batches with fewer valid tokens) reuse the one compiled graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = tiny_module(datamodule, loss=ForwardKLLoss(temperature=2.0), chunk_size=40).eval()
    compiled = tiny_module(
        datamodule,
        student=eager.student,
        teacher=eager.teacher,
        loss=ForwardKLLoss(temperature=2.0),
        chunk_size=40,
        compile_loss=True,
    ).eval()
    batch = next(iter(datamodule.train_dataloader()))
    counters.clear()
    reference, reference_grads = _loss_and_grads(eager, batch)  # the closed form (the default path)
    fused, fused_grads = _loss_and_grads(compiled, batch)  # 124 tokens: chunks of 42, 41, 41
    for key in reference:
        torch.testing.assert_close(fused[key], reference[key], rtol=1e-4, atol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for masked in (30, 61):  # 94 tokens (chunks of 32, 31, 31), then 63 (32, 31)
        shorter = {**batch, "labels": batch["labels"].clone()}
        shorter["labels"].view(-1)[:masked] = -100
        _loss_and_grads(compiled, shorter)
    assert counters["stats"]["unique_graphs"] == graphs, "a chunk of another size was compiled again"


class PoisonedTeacher(DistillationModule):
    """A corrupted teacher: its hidden states are NaN at the given steps."""

    poison_steps: set[int]

    def teacher_forward(self, batch):
        body = super().teacher_forward(batch)
        if self.training and self.global_step in self.poison_steps:
            return body._replace(last=body.last * float("nan"))
        return body


def poisoned(datamodule, steps, **kwargs):
    module = tiny_module(datamodule, cls=PoisonedTeacher, **kwargs)
    module.poison_steps = set(steps)
    return module


def test_a_non_finite_loss_stops_with_the_step_and_the_term_and_saves_nothing_from_it(datamodule, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from distilkit.errors import TrainingStopped

    module = poisoned(datamodule, {2})
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = tiny_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoint])
    with pytest.raises(TrainingStopped, match=r"step 2: non-finite loss terms \['loss', 'kd_loss'\]"):
        trainer.fit(module, datamodule)
    steps = sorted(
        torch.load(p, weights_only=True)["global_step"] for p in (tmp_path / "ckpt").glob("*.ckpt")
    )
    assert steps == [1, 2], "a checkpoint was written after the bad step"
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_skip_skips_the_update_counts_it_and_stops_after_too_many_in_a_row(datamodule, tmp_path):
    from distilkit.errors import TrainingStopped

    module = poisoned(datamodule, {1, 2}, nonfinite="skip")
    trainer = tiny_trainer(tmp_path, max_steps=5)
    trainer.fit(module, datamodule)
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    assert (
        module.guard.total == 2 and trainer.global_step == 5
    )  # a skipped step consumes its batch, updates nothing

    stubborn = poisoned(datamodule, set(range(100)), nonfinite="skip", max_nonfinite_skips=3)
    with pytest.raises(TrainingStopped, match="4 steps in a row were skipped"):
        tiny_trainer(tmp_path, max_steps=10).fit(stubborn, datamodule)


def test_a_non_finite_student_is_never_checkpointed(datamodule, tmp_path):
    from distilkit.errors import TrainingStopped
    from distilkit.run import RunState

    module = tiny_module(datamodule)
    with torch.no_grad():
        next(module.student.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingStopped, match="no checkpoint was written"):
        RunState().on_save_checkpoint(tiny_trainer(tmp_path), module, {})


def test_all_finite_is_exact_even_when_the_norm_overflows():
    from distilkit.models.sharding import all_finite

    assert all_finite([torch.full((4,), 1e30), torch.ones(3)])  # squares overflow float32, values are finite
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")])])
    assert all_finite([])
