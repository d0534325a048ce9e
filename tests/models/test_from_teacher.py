"""``student: {from_teacher: {...}}`` through the module: cut at init or in setup on the run's first training
batches, replaced by a checkpoint, exported and reloaded; bad specs as one-line errors naming the field."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from helpers import TINY_TEACHER, fit_run, resume_run, run_cli, tiny_module, tiny_recipe, tiny_trainer
from transformers import AutoModelForCausalLM

from distilkit import DistillationModule
from distilkit.commands.export import export_student
from distilkit.errors import ConfigError
from distilkit.models.from_teacher import StudentCut
from distilkit.models.pruning import cut_from_teacher

FIELD = "model.student.from_teacher"
LLAMA_TEACHER = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}


def cut_spec(**body):
    return {"from_teacher": body}


def ids(vocab: int) -> torch.Tensor:
    return torch.arange(24).view(2, 12) * 7 % vocab  # (B, T)


def test_a_cut_without_data_is_the_library_cut_made_at_init(datamodule):
    spec = cut_spec(n_layer=1, n_embd=32, layers=[1], importance="magnitude")
    module = tiny_module(datamodule, student=spec)
    assert not module.student_cut.pending and module.student_cut.report.layers == [1]
    expected, _ = cut_from_teacher(
        module.teacher, {"n_layer": 1, "n_embd": 32}, layers=[1], importance="magnitude"
    )
    assert module.student.training and all(p.requires_grad for p in module.student.parameters())
    with torch.no_grad():
        torch.testing.assert_close(
            module.eval()(ids(datamodule.vocab_size)), expected(ids(datamodule.vocab_size)).logits
        )


@pytest.mark.parametrize("ranking", ["influence", "loss"])
def test_a_cut_that_ranks_on_data_uses_the_first_training_batches(datamodule, tmp_path, ranking):
    spec = cut_spec(n_layer=1, n_embd=32, calibration_batches=3, layer_ranking=ranking)  # width by activation
    module = tiny_module(datamodule, student=spec)
    assert module.student_cut.pending and module.student_cut.report is None
    provisional = module.student
    tiny_trainer(tmp_path).validate(module, datamodule=datamodule, verbose=False)  # setup cuts, on any stage
    assert module.student is not provisional and not module.student_cut.pending

    batches = list(itertools.islice(datamodule.train_dataloader(), 3))
    targets = {"n_layer": 1, "n_embd": 32}
    expected, report = cut_from_teacher(module.teacher, targets, calibration=batches, layer_ranking=ranking)
    assert (report.drop_order is not None) == (ranking == "loss")
    assert module.student_cut.report.layers == report.layers
    assert module.student_cut.report.channels == report.channels
    with torch.no_grad():
        got = module.eval()(ids(datamodule.vocab_size))
        torch.testing.assert_close(got, expected(ids(datamodule.vocab_size)).logits)


def test_without_a_data_module_the_error_names_the_calibration_field(datamodule, tmp_path):
    module = tiny_module(datamodule, student=cut_spec(n_layer=1))
    loader = datamodule.train_dataloader()
    with pytest.raises(ConfigError, match=rf"{FIELD}.calibration_batches=8: .*no data module"):
        tiny_trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=loader)


@pytest.mark.parametrize(
    "teacher,spec",
    [
        (TINY_TEACHER, cut_spec(n_layer=1, n_embd=32, calibration_batches=2)),
        (
            LLAMA_TEACHER,
            cut_spec(num_hidden_layers=1, num_key_value_heads=1, hidden_size=32, calibration_batches=2),
        ),
    ],
    ids=["gpt2", "llama-gqa"],
)
def test_a_cut_student_checkpoint_exports_reloads_and_replaces_a_pending_cut(
    datamodule, tmp_path, teacher, spec
):
    module = tiny_module(datamodule, teacher=teacher, student=spec)
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    x = ids(datamodule.vocab_size)
    with torch.no_grad():
        trained = module.eval()(x)

    loaded = DistillationModule.load_from_checkpoint(tmp_path / "cut.ckpt", weights_only=True)
    assert not loaded.student_cut.pending  # the checkpoint replaced the cut: setup does not cut again
    loaded.setup("fit")
    export_student(tmp_path / "cut.ckpt", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.model_type == teacher["model_type"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), trained)
        torch.testing.assert_close(exported(x).logits, trained, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_with_another_config_rebuilds_the_student():
    cut = StudentCut.parse(cut_spec(num_hidden_layers=1))
    teacher = AutoModelForCausalLM.from_config(_qwen2_with_sliding_layers())
    provisional = cut.build(teacher)  # blocks ranked on data: a provisional student of the first block
    assert cut.pending and provisional.config.layer_types == ["full_attention"]
    stored = {**provisional.config.to_dict(), "layer_types": ["sliding_attention"]}
    rebuilt = cut.restored(provisional, stored)
    assert rebuilt is not provisional and rebuilt.config.layer_types == ["sliding_attention"]
    assert not cut.pending
    same = cut.restored(rebuilt, rebuilt.config.to_dict())
    assert same is rebuilt


def _qwen2_with_sliding_layers():
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen2",
        vocab_size=64,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,  # layer 0 full attention, layer 1 sliding
    )


@pytest.mark.parametrize(
    "teacher,spec,match",
    [
        (None, cut_spec(n_layer=1), rf"{FIELD}=.*there is no teacher"),
        (
            TINY_TEACHER,
            {"from_teacher": {"n_layer": 1}, "model_type": "gpt2"},
            r"model.student=.*mixes from_teacher",
        ),
        (TINY_TEACHER, cut_spec(n_layer=1, importance="random"), rf"{FIELD}.importance='random'"),
        (TINY_TEACHER, cut_spec(n_layer=1, layer_ranking="cos"), rf"{FIELD}.layer_ranking='cos'"),
        (TINY_TEACHER, cut_spec(n_layer=1, calibration_batches=-1), rf"{FIELD}.calibration_batches=-1"),
        (
            TINY_TEACHER,
            cut_spec(n_embd=32, calibration_batches=0),
            rf"{FIELD}.calibration_batches=None: activation",
        ),
        (
            TINY_TEACHER,
            cut_spec(n_layer=1, calibration_batches=0),
            rf"{FIELD}.calibration_batches=None: ranking",
        ),
        (TINY_TEACHER, cut_spec(n_embd=128), rf"{FIELD}.n_embd=128: exceeds the teacher's n_embd=64"),
        (TINY_TEACHER, cut_spec(layers=[0, 0]), rf"{FIELD}.layers=\[0, 0\]: repeats a block"),
    ],
)
def test_bad_specs_fail_at_init_naming_the_field(datamodule, teacher, spec, match):
    with pytest.raises(ConfigError, match=match):
        tiny_module(datamodule, teacher=teacher, student=spec)


@pytest.mark.slow
def test_the_cli_fits_resumes_and_exports_a_cut_student(
    tmp_path, corpus, tokenizer_dir, cache_dir, monkeypatch
):
    recipe = tiny_recipe(tmp_path / "cut.yaml", corpus, tokenizer_dir, cache_dir)
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"]["student"] = cut_spec(n_layer=1, n_embd=32, calibration_batches=2)
    recipe.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    calibrations = []
    finish_for = StudentCut.finish_for
    monkeypatch.setattr(
        StudentCut, "finish_for", lambda cut, *args: calibrations.append(1) or finish_for(cut, *args)
    )
    fit_run(recipe, run_dir)
    assert len(calibrations) == 1
    resume_run(recipe, run_dir, 6)  # issue 21.2: the checkpoint's student replaces the pending one, uncut
    assert len(calibrations) == 1, "a resumed run paid the calibration"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    run_cli("export", "--ckpt_path", str(last), "--output_dir", str(tmp_path / "export"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (exported.config.n_layer, exported.config.n_embd) == (1, 32)
    module = DistillationModule.load_from_checkpoint(last, weights_only=True)
    x = ids(exported.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, module.eval()(x), rtol=1e-5, atol=1e-5)
