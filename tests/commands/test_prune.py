"""``distilkit prune``: the cut a recipe's fit makes, as a Hugging Face directory with the tokenizer; explicit
arguments; what it prints; bad input as one line with exit status 2 and nothing written."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from helpers import (
    ROOT,
    TEACHER,
    TINY_TEACHER,
    fit_run,
    make_datamodule,
    resume_run,
    run_cli,
    tiny_module,
    tiny_recipe,
    tiny_trainer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilkit import DistillationModule

CUT = {"n_layer": 1, "n_embd": 32, "calibration_batches": 2}


def pruned_recipe(tmp_path, corpus, tokenizer_dir, cache_dir, **cut):
    recipe = tiny_recipe(tmp_path / "pruned.yaml", corpus, tokenizer_dir, cache_dir)
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"]["student"] = {"from_teacher": {**CUT, **cut}}
    recipe.write_text(yaml.safe_dump(config))
    return recipe


def test_prune_writes_the_cut_fit_makes(tmp_path, corpus, tokenizer_dir, cache_dir, capsys):
    recipe = pruned_recipe(tmp_path, corpus, tokenizer_dir, cache_dir)
    with pytest.warns(UserWarning, match="the teacher is a config mapping, so its weights are random"):
        run_cli("prune", "--config", str(recipe), "--output_dir", str(tmp_path / "student"))
    printed = capsys.readouterr().out
    assert (
        "calibration: 2 batches x 4 blocks x 32 tokens (256 tokens), the first of the training data"
        in printed
    )
    assert "parameters:" in printed and "blocks kept (ranked by block influence)" in printed
    assert "block influence 1 - cos(input, output)" in printed and "heads kept" in printed
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert pruned.config.n_layer == 1 and pruned.config.n_embd == 32 and len(tokenizer) == 512

    L.seed_everything(0, verbose=False)  # as fit seeds before building the (random) teacher
    datamodule = make_datamodule(corpus, tokenizer_dir, cache_dir)
    module = tiny_module(datamodule, teacher=TINY_TEACHER, student={"from_teacher": CUT})
    tiny_trainer(tmp_path).validate(module, datamodule=datamodule, verbose=False)  # the cut fit makes
    ids = tokenizer("The for statement is used", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, module.eval()(ids))


def test_prune_from_arguments_without_data_keeps_the_teachers_tokenizer(tmp_path, capsys):
    out = tmp_path / "student"
    targets = "{n_layer: 2, n_embd: 128, n_inner: 512}"
    run_cli("prune", "--teacher", str(TEACHER), "--targets", targets, "--layers", "[0, 2]", "--importance",
            "magnitude", "--output_dir", str(out))  # fmt: skip
    printed = capsys.readouterr().out
    assert "4.24 M -> 0.94 M" in printed and "blocks kept (named): [0, 2]" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_inner) == (2, 128, 512)
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(TEACHER).get_vocab()
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--targets", "{n_layer: 1}"], "teacher=None: there is no teacher to cut from"),
        (
            ["--teacher", str(TEACHER), "--targets", "{n_layer: 2}"],
            "data_files=None: this cut ranks blocks or width on calibration data",
        ),
        (
            ["--teacher", str(TEACHER), "--targets", "{n_layer: 5}", "--importance", "magnitude"],
            "targets.n_layer=5: exceeds the teacher's n_layer=4",
        ),
        (["--config", str(ROOT / "recipes" / "quickstart.yaml")], "its student is not cut from the teacher"),
    ],
)
def test_bad_prune_input_exits_2_and_writes_nothing(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("prune", *args, "--output_dir", str(tmp_path / "out"))
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_pruned_student_trains_through_lora_resumes_and_exports(tmp_path, corpus, tokenizer_dir, cache_dir):
    """The LoRA recipe's flow, tiny: prune, then fit the pruned directory through adapters, resume, export."""
    recipe = pruned_recipe(tmp_path, corpus, tokenizer_dir, cache_dir)
    run_cli("prune", "--config", str(recipe), "--output_dir", str(tmp_path / "student"))
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"]["student"] = str(tmp_path / "student")
    config["model"]["init_args"]["student_adapter"] = {
        "r": 2,
        "alpha": 4,
        "target_modules": ["c_attn", "c_fc"],
    }
    recipe.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    fit_run(recipe, run_dir)
    resume_run(recipe, run_dir, 6)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])

    run_cli("export", "--ckpt_path", str(last), "--output_dir", str(tmp_path / "export"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    module = DistillationModule.load_from_checkpoint(last, weights_only=True)
    ids = AutoTokenizer.from_pretrained(tmp_path / "export")("The while loop", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module.eval()(ids), rtol=1e-5, atol=1e-5)


def test_a_batch_size_given_with_a_recipe_is_used_and_said_to_differ_from_the_fits(
    tmp_path, corpus, tokenizer_dir, cache_dir, capsys
):
    """Issue 21.8: the cut ranks on the first batches, so another batch size ranks on other blocks;
    --batch_size with --config was ignored without a word, now it is used and the difference said."""
    recipe = pruned_recipe(tmp_path, corpus, tokenizer_dir, cache_dir)
    with pytest.warns(UserWarning) as caught:
        run_cli("prune", "--config", str(recipe), "--batch_size", "2", "--output_dir", str(tmp_path / "s"))
    said = [str(w.message) for w in caught]
    assert any(
        "batch_size=2: the recipe's fit calibrates on batches of 4 (data.batch_size)" in m for m in said
    )
    assert "calibration: 2 batches x 2 blocks x 32 tokens" in capsys.readouterr().out


def test_ctrl_c_during_prune_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from distilkit.models import from_teacher

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("not reached: Ctrl-C stops at once")  # pragma: no cover

    monkeypatch.setattr(from_teacher.StudentCut, "finish", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("prune", "--teacher", str(TEACHER), "--targets", "{n_layer: 2}", "--data_files",
                "builtin:python-reference", "--output_dir", str(tmp_path / "s"))  # fmt: skip
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "stopped: Ctrl-C: stopped at once; nothing was written (a cut is one job: run it again)"
    )
    assert not (tmp_path / "s").exists()
