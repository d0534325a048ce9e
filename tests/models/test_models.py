"""Loading teachers and students: config mappings, local directories, modules, vocabulary checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from distilkit import DistillationModule
from distilkit.errors import ConfigError
from distilkit.models.heads import body_features, check_head, output_head
from distilkit.models.loading import load_causal_lm, shared_vocab_size

FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
    },
    "qwen2": {
        "model_type": "qwen2",
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}
DEFAULTS = {"vocab_size": 300, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_builds_from_a_config_mapping(family):
    model = load_causal_lm(FAMILIES[family], field="model.student", defaults=DEFAULTS)
    assert model.config.model_type == family
    assert model.config.vocab_size == 300
    assert model.config.max_position_embeddings == 64
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, 300, (2, 8))
    head = output_head(model, 300)
    check_head(model, head, "model.student")
    torch.testing.assert_close(
        head(body_features(model, ids, None).last), model(ids).logits, rtol=1e-5, atol=1e-5
    )


def test_mapping_values_win_over_defaults():
    model = load_causal_lm({**FAMILIES["gpt2"], "n_positions": 16}, field="model.student", defaults=DEFAULTS)
    assert model.config.n_positions == 16


def test_a_mistyped_config_field_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model.student.n_layers.*did you mean 'n_layer'"):
        load_causal_lm({**FAMILIES["gpt2"], "n_layers": 3}, field="model.student", defaults=DEFAULTS)


def test_missing_or_unknown_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type"):
        load_causal_lm({"n_layer": 2}, field="model.student")
    with pytest.raises(ConfigError, match="model.student.model_type"):
        load_causal_lm({"model_type": "gpt3000"}, field="model.student")


def test_loads_a_local_hugging_face_directory_in_the_asked_dtype(tmp_path):
    built = load_causal_lm(FAMILIES["llama"], field="model.teacher", defaults=DEFAULTS)
    built.save_pretrained(tmp_path / "teacher")
    loaded = load_causal_lm(str(tmp_path / "teacher"), field="model.teacher", dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert not loaded.training
    ids = torch.randint(0, 300, (1, 6))
    torch.testing.assert_close(loaded(ids).logits.float(), built(ids).logits, rtol=0.05, atol=0.05)


def test_a_missing_teacher_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.teacher='.*nowhere'.*not a directory"):
        load_causal_lm(str(tmp_path / "nowhere"), field="model.teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"), field="model.teacher")


def test_a_module_passes_through():
    module = nn.Linear(2, 2)
    assert load_causal_lm(module, field="model.student") is module


def test_different_vocabularies_are_an_error_naming_both_sizes():
    student = load_causal_lm(FAMILIES["gpt2"], field="s", defaults={**DEFAULTS, "vocab_size": 300})
    teacher = load_causal_lm(FAMILIES["gpt2"], field="t", defaults={**DEFAULTS, "vocab_size": 400})
    with pytest.raises(ConfigError, match=r"400.*300"):
        shared_vocab_size(student, teacher, tokenizer_size=None)
    small_teacher = load_causal_lm(FAMILIES["gpt2"], field="t", defaults={**DEFAULTS, "vocab_size": 280})
    with pytest.raises(ConfigError, match=r"model.teacher.*280.*300.*290"):
        shared_vocab_size(student, small_teacher, tokenizer_size=290)


def test_a_padded_vocabulary_uses_the_shared_tokenizer_size():
    """Like Qwen: one model pads its embedding rows past the tokenizer's size."""
    student = load_causal_lm(FAMILIES["qwen2"], field="s", defaults={**DEFAULTS, "vocab_size": 300})
    teacher = load_causal_lm(FAMILIES["qwen2"], field="t", defaults={**DEFAULTS, "vocab_size": 320})
    assert shared_vocab_size(student, teacher, tokenizer_size=300) == 300
    module = DistillationModule(student=student, teacher=teacher, vocab_size=300, chunk_size=4)
    ids = torch.randint(0, 300, (2, 9))
    losses = module.compute_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert torch.isfinite(losses["loss"])
    assert module(ids).shape == (2, 9, 300)


def test_a_student_smaller_than_the_tokenizer_is_refused():
    student = load_causal_lm(FAMILIES["gpt2"], field="s", defaults={**DEFAULTS, "vocab_size": 300})
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        shared_vocab_size(student, None, tokenizer_size=301)


def test_softcapped_logits_are_reproduced_by_the_chunked_head():
    model = load_causal_lm(
        {
            "model_type": "gemma2",
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
            "head_dim": 16,
            "final_logit_softcapping": 3.0,
        },
        field="model.student",
        defaults=DEFAULTS,
    )
    head = output_head(model, 300)
    assert head.softcap == 3.0
    check_head(model, head, "model.student")


def test_a_model_with_unknown_logit_processing_is_refused():
    model = load_causal_lm(FAMILIES["gpt2"], field="s", defaults=DEFAULTS)
    original = model.forward

    def doubled(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(ConfigError, match="chunk_size: null"):
        check_head(model, output_head(model, 300), "model.student")


def test_hugging_face_models_save_and_reload(tmp_path):
    model = load_causal_lm(FAMILIES["gpt_neox"], field="s", defaults=DEFAULTS)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model))


def test_a_block_size_beyond_the_models_positions_is_refused(tmp_path):
    teacher = load_causal_lm({**FAMILIES["gpt2"], "n_positions": 16}, field="t", defaults=DEFAULTS)
    with pytest.raises(ConfigError, match=r"data.block_size=32: is longer than model.teacher's 16 positions"):
        DistillationModule(student=FAMILIES["gpt2"], teacher=teacher, vocab_size=300, block_size=32)


@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_a_teacher_with_unreadable_weights_is_one_line(
    damage, tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    from helpers import fit_run, tiny_model_dir, tiny_recipe
    from transformers import AutoTokenizer

    teacher = tiny_model_dir(tmp_path / "teacher", AutoTokenizer.from_pretrained(tokenizer_dir))
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"garbage")
    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus, tokenizer_dir, cache_dir)
    capsys.readouterr()  # the progress bars of writing the teacher
    with pytest.raises(SystemExit) as exit_info:
        fit_run(recipe, tmp_path / "run", "--model.init_args.teacher", str(teacher))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"model.teacher='{teacher}': could not be loaded (Error while deserializing header" in err


def test_a_config_mappings_vocab_size_above_the_tokenizers_is_said_in_one_warning():
    """Issue 21.8: a random-init model padded past the tokenizer keeps rows no token uses: never trained (the
    losses compare the tokenizer's size), yet exported. Said, not refused: padding can be on purpose."""
    spec = {**FAMILIES["gpt2"], "vocab_size": 320}
    with pytest.warns(
        UserWarning, match=r"model.peers\[1\].vocab_size=320 is above the tokenizer's 300: its last 20 rows"
    ):
        model = load_causal_lm(spec, field="model.peers[1]", defaults=DEFAULTS)
    assert model.config.vocab_size == 320
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_causal_lm(FAMILIES["gpt2"], field="model.student", defaults=DEFAULTS)  # the tokenizer's: silent
