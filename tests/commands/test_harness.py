"""`distilkit evaluate --lm_eval_tasks`: lm-evaluation-harness on distilkit models, tasks on local files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEACHER, run_cli

from distilkit.commands.evaluate import evaluate
from distilkit.commands.harness import Harness
from distilkit.errors import ConfigError
from distilkit.models.checkpoint import load_model_and_tokenizer

DOCS = [
    {
        "text": "The for statement iterates over a sequence.",
        "question": "Which loops?",
        "choices": ["for", "del"],
    },
    {
        "text": "The import statement binds a module.",
        "question": "Which loads a module?",
        "choices": ["del", "import"],
    },
]
ANSWERS = [0, 1]


def local_tasks(tmp_path: Path) -> tuple[Path, Path]:
    """Two harness tasks on a local jsonl: rolling log-likelihood (bits per byte) and multiple choice."""
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({**doc, "answer": a}) + "\n" for doc, a in zip(DOCS, ANSWERS, strict=True))
    )
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    rolling = tmp_path / "local_bpb.yaml"
    rolling.write_text(
        "task: local_bpb\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
    )
    choice = tmp_path / "local_choice.yaml"
    choice.write_text(
        "task: local_choice\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: 'Q: {{question}}\\nA:'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    return rolling, choice


@torch.no_grad()
def direct_scores(model_dir: Path) -> tuple[float, float]:
    """Bits per byte of DOCS and multiple-choice accuracy, computed here from the model's log-probs."""
    model, tokenizer = load_model_and_tokenizer(model_dir)

    def logprob(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([context + continuation])
        logp = model(ids).logits.float().log_softmax(-1)[0, len(context) - 1 : -1]
        return float(logp.gather(-1, torch.tensor(continuation)[:, None]).sum())

    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    nats = sum(-logprob([tokenizer.eos_token_id], encode(doc["text"])) for doc in DOCS)
    n_bytes = sum(len(doc["text"].encode()) for doc in DOCS)
    correct = []
    for doc, answer in zip(DOCS, ANSWERS, strict=True):
        context = encode(f"Q: {doc['question']}\nA:")
        scores = [logprob(context, encode(" " + choice)) for choice in doc["choices"]]  # harness: " " between
        correct.append(float(np.argmax(scores) == answer))
    return nats / n_bytes / math.log(2), float(np.mean(correct))


def test_the_harness_scores_what_the_model_computes_on_local_tasks(tmp_path):
    rolling, choice = local_tasks(tmp_path)
    rows = evaluate(
        [str(TEACHER)],
        block_size=32,
        batch_size=4,
        lm_eval_tasks=[str(rolling), str(choice)],
        output_json=str(tmp_path / "e.json"),
        progress=False,
    )
    bits_per_byte, accuracy = direct_scores(TEACHER)
    scores = rows[0]["lm_eval"]
    assert scores["local_bpb"]["bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-4)
    assert scores["local_choice"]["acc"] == pytest.approx(accuracy)
    assert json.loads((tmp_path / "e.json").read_text())[0]["lm_eval"] == scores


def test_the_shipped_task_holds_out_what_training_validates_on(cache_dir):
    from distilkit import TextDataModule
    from distilkit.commands.lm_eval_tasks.python_reference import held_out_documents

    data = TextDataModule(
        "builtin:python-reference", tokenizer=str(TEACHER), val_fraction=0.1, seed=0, cache_dir=str(cache_dir)
    )
    data.setup()
    tokenizer = data.tokenizer
    texts = held_out_documents(val_fraction=0.1, seed=0)["test"]["text"]
    stream = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [0]]
    val = data.datasets["val"]
    assert torch.equal(val.tokens[val.valid], torch.tensor(stream))


def test_evaluate_cli_prints_both_tables_and_runs_the_shipped_task_on_a_checkpoint(
    tmp_path, tiny_run, corpus, capsys
):
    run_cli(
        "evaluate",
        "--models",
        f"[{tiny_run}]",
        "--data_files",
        str(corpus),
        "--block_size",
        "32",
        "--lm_eval_tasks",
        "[distilkit_python_reference]",
        "--lm_eval_limit",
        "2",
        "--output_json",
        str(tmp_path / "e.json"),
    )
    out = capsys.readouterr().out
    assert "ppl" in out and "lm-evaluation-harness" in out and "bits_per_byte" in out  # both tables
    (row,) = json.loads((tmp_path / "e.json").read_text())
    scores = row["lm_eval"]["distilkit_python_reference"]
    assert set(scores) == {"bits_per_byte", "byte_perplexity", "word_perplexity"}
    assert scores["byte_perplexity"] == pytest.approx(2 ** scores["bits_per_byte"], rel=1e-6)


@pytest.mark.parametrize(
    "tasks,match",
    [
        (["missing/task.yaml"], "is not a file"),
        (["distilkit_python_referense"], r"did you mean \['distilkit_python_reference'"),
        ([], "is empty"),
    ],
)
def test_bad_tasks_are_refused_by_name(tasks, match):
    with pytest.raises(ConfigError, match=match):
        Harness(tasks)


def test_without_the_eval_extra_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ConfigError, match=r"pip install 'distilkit\[eval\]'"):
        Harness(["distilkit_python_reference"])
