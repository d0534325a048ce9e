"""A checkpoint written by distilkit 0.1 (before the package was split into layers) still resumes, exactly
as 0.1 resumed it, and still exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers import run_cli
from transformers import AutoModelForCausalLM

FIXTURE = Path(__file__).parents[1] / "fixtures" / "layout_v0"


def _run_dir(tmp_path: Path) -> tuple[Path, Path]:
    recipe = (FIXTURE / "recipe.yaml").read_text()
    for name, value in (("CORPUS", FIXTURE / "corpus.jsonl"), ("TOKENIZER", FIXTURE / "tokenizer")):
        recipe = recipe.replace(name, str(value))
    recipe = recipe.replace("CACHE", str(tmp_path / "cache"))
    (tmp_path / "recipe.yaml").write_text(recipe)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURE / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    return tmp_path / "recipe.yaml", run_dir


def test_a_0_1_checkpoint_resumes_exactly_as_0_1_resumed_it(tmp_path):
    recipe, run_dir = _run_dir(tmp_path)
    run_cli(
        "fit",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.max_steps",
        "5",
        "--ckpt_path",
        "last",
    )
    resumed = torch.load(run_dir / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=True)
    expected = torch.load(FIXTURE / "expected_state_step4.pt", weights_only=True)
    assert resumed["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    curriculum = resumed["callbacks"]["CurriculumCallback"]["state"]
    assert curriculum["stage"] == 1 and curriculum["knobs"] == {"kd_ratio": 0.7}


def test_a_0_1_checkpoint_exports(tmp_path):
    out = tmp_path / "student"
    run_cli("export", "--ckpt_path", str(FIXTURE / "last.ckpt"), "--output_dir", str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(FIXTURE / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.transformer.wte.weight, state["student.transformer.wte.weight"])
