"""LoRA students: only the adapters train and are checkpointed, export merges them exactly, a checkpoint is
refused on another base model, bad settings are one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import TINY_STUDENT, tiny_module, tiny_trainer
from transformers import AutoModelForCausalLM

from distilkit import DistillationModule
from distilkit.commands.export import export_student
from distilkit.errors import ConfigError
from distilkit.models.adapters import merge_adapters, weights_sha256
from distilkit.models.loading import load_causal_lm

ADAPTER = {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}


@pytest.fixture
def base_dir(datamodule, tmp_path):
    """A pretrained student (here: random, saved) as a Hugging Face directory."""
    torch.manual_seed(0)
    defaults = {"vocab_size": datamodule.vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    model = load_causal_lm(TINY_STUDENT, field="student", defaults=defaults)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def trained(datamodule, base_dir, tmp_path):
    module = tiny_module(datamodule, student=str(base_dir), student_adapter=ADAPTER)
    trainer = tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    return module, trainer, tmp_path / "lora.ckpt"


def ids(vocab: int) -> torch.Tensor:
    return torch.arange(24).view(2, 12) * 5 % vocab  # (B, T)


def test_only_the_adapters_train_and_are_checkpointed(datamodule, base_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    module, trainer, ckpt = trained(datamodule, base_dir, tmp_path)

    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters() if p.requires_grad}
    lora_b = [p for n, p in module.student.named_parameters() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in lora_b), "the adapters did not train (B starts at zero)"
    merged_free = {
        k.replace(".base_layer", ""): v for k, v in module.student.state_dict().items() if "lora_" not in k
    }
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in merged_free.items()), "the base changed"

    checkpoint = torch.load(ckpt, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {f"student.{n}" for n in trainable}
    record = checkpoint["distilkit"]["adapters"]["student"]
    assert record["base"] == str(base_dir.resolve()) and record["settings"]["r"] == 4
    assert record["base_sha256"] == weights_sha256(base)


def test_export_merges_the_adapters_into_the_adapted_logits(datamodule, base_dir, tmp_path):
    module, _, ckpt = trained(datamodule, base_dir, tmp_path)
    x = ids(datamodule.vocab_size)
    with torch.no_grad():
        adapted = module.eval()(x)
    export_student(ckpt, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any("lora" in k for k in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, adapted, rtol=1e-5, atol=1e-5)
    loaded = DistillationModule.load_from_checkpoint(ckpt, weights_only=True)  # the base from its spec
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), adapted)
        torch.testing.assert_close(merge_adapters(loaded.student)(x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_a_changed_base_model_is_refused(datamodule, base_dir, tmp_path):
    _, _, ckpt = trained(datamodule, base_dir, tmp_path)
    changed = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3  # same shapes, other weights
    changed.save_pretrained(base_dir)
    with pytest.raises(ConfigError, match="is not the base model the adapters were trained on"):
        DistillationModule.load_from_checkpoint(ckpt, weights_only=True)
    with pytest.raises(ConfigError, match="is not the base model the adapters were trained on"):
        export_student(ckpt, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "adapter,student,match",
    [
        (
            {"lora_alpha": 8},
            None,
            r"model.student_adapter.lora_alpha=8: is not a LoRA setting; did you mean .alpha.",
        ),
        ({"rank": 4}, None, r"model.student_adapter.rank=4: is not a LoRA setting; use \[.alpha."),
        ({"r": 0}, None, r"model.student_adapter.r=0: must be a positive integer"),
        ({"dropout": 1.0}, None, r"model.student_adapter.dropout=1.0"),
        (
            {"target_modules": ["q_proj"]},
            None,
            r"model.student_adapter.target_modules=\['q_proj'\]: does not fit",
        ),
        ({}, TINY_STUDENT, r"model.student=.*LoRA adapts a pretrained student"),
        ({}, {"from_teacher": {"n_layer": 1, "layers": [0]}}, r"model.student=.*LoRA adapts a pretrained"),
    ],
)
def test_bad_adapter_settings(datamodule, base_dir, adapter, student, match):
    with pytest.raises(ConfigError, match=match):
        tiny_module(datamodule, student=student or str(base_dir), student_adapter=adapter)


def test_a_missing_peft_names_the_extra(datamodule, base_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ConfigError, match=r"distilkit\[lora\]"):
        tiny_module(datamodule, student=str(base_dir), student_adapter=ADAPTER)
