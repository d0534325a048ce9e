"""The teacher-source seam: a source given in code is used as it is, a module learns from any source the same
way, and a live teacher stays frozen, in eval mode and out of checkpoints whatever its module does."""

from __future__ import annotations

import copy

import torch
from helpers import tiny_module, tiny_trainer

from distilkit.teachers import LiveTeacher, TeacherSource


def test_a_source_given_in_code_teaches_as_the_model_it_wraps(datamodule):
    torch.manual_seed(0)
    plain = tiny_module(datamodule).eval()
    source = LiveTeacher(copy.deepcopy(plain.teacher), plain.vocab_size)
    wrapped = tiny_module(datamodule, teacher=source, student=copy.deepcopy(plain.student)).eval()
    assert wrapped.teacher_source is source and isinstance(wrapped.teacher_source, TeacherSource)
    batch = next(iter(datamodule.train_dataloader()))
    for name, value in plain.compute_loss(batch).items():
        torch.testing.assert_close(wrapped.compute_loss(batch)[name], value, msg=name)


def test_a_live_source_stays_frozen_in_eval_mode_and_out_of_checkpoints(datamodule, tmp_path):
    module = tiny_module(datamodule)
    module.train()
    assert module.teacher is not None and not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher_source.parameters())
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)["state_dict"]
    assert saved and all(key.startswith("student.") for key in saved)
    assert module.teacher_source.identity()["kind"] == "live"
