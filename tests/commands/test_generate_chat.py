"""``distilkit generate --chat``: the model's answers as conversations that training reads, stopped at the
template's end-of-turn token, and a run that continues after an interruption without duplicating rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import THREE_TURNS, chat_tokenizer, run_cli, tiny_model_dir, write_jsonl
from torch.utils.data import default_collate

import distilkit.commands.generate as generate_command
from distilkit import TextDataModule
from distilkit.batch import assistant_replies
from distilkit.commands.generate import generate
from distilkit.errors import ConfigError, RunInterrupted
from distilkit.models.checkpoint import load_model_and_tokenizer
from distilkit.models.replies import generate_replies, prompt_ids

TINY_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}
PROMPTS = [
    {"prompt": "What is two plus two?", "kind": "math", "id": 0},
    {"messages": THREE_TURNS[:4], "kind": "chat", "id": 1},
    {"prompt": "Thanks!", "kind": "chat", "id": 2},
    {"text": "How are you today?", "id": 3},
    {"prompt": "And three plus three?", "id": 4},
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a SmolLM2-style tokenizer (ChatML, ``<|im_end|>`` ends a turn)."""
    root = tmp_path_factory.mktemp("chat-model")
    return tiny_model_dir(root / "model", chat_tokenizer("llama", root / "tokenizer"), TINY_LLAMA)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ending_at(model: torch.nn.Module, token: int, position: int) -> None:
    """Make ``model`` write ``token`` from ``position`` on, and never before (a row whose prompt has ``n``
    tokens then samples ``position - n + 2`` tokens, the last one ``token``)."""

    def hook(module, args, kwargs, output):
        late = kwargs["position_ids"][:, -1] >= position  # (B,)
        output.logits[:, -1, token] = torch.where(late, 1e4, -1e4)

    model.register_forward_hook(hook, with_kwargs=True)


def test_chat_rows_hold_each_prompt_and_the_models_answer(
    chat_model, prompts, tmp_path, cache_dir, monkeypatch
):
    model, tokenizer = load_model_and_tokenizer(str(chat_model))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = [
        r["messages"] if "messages" in r else [{"role": "user", "content": r.get("prompt", r.get("text"))}]
        for r in PROMPTS
    ]
    lengths = [len(ids) for ids in prompt_ids(tokenizer, tokenizer.chat_template, conversations)]
    threshold = max(lengths) + 2
    ending_at(model, end, position=threshold)  # long prompts end their turn within 6 tokens, short ones not
    monkeypatch.setattr(generate_command, "load_model_and_tokenizer", lambda name, **_: (model, tokenizer))
    out = generate(
        str(chat_model), str(tmp_path / "answers.jsonl"), prompts=str(prompts), chat=True,
        max_new_tokens=6, batch_size=2, temperature=0.8,
    )  # fmt: skip
    rows = read_rows(out)
    assert [row["id"] for row in rows] == [0, 1, 2, 3, 4]  # in order, other fields copied
    assert rows[0]["kind"] == "math" and "kind" not in rows[3]
    assert rows[0]["messages"][0] == {"role": "user", "content": "What is two plus two?"}
    assert rows[1]["messages"][:4] == THREE_TURNS[:4]
    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)
    finish = [row["finish_reason"] for row in rows]
    # the k-th sampled token (from 0) is predicted at position length - 1 + k: forced once that >= threshold
    assert finish == ["stop" if n - 1 + 5 >= threshold else "length" for n in lengths]
    assert set(finish) == {"stop", "length"}
    assert not out.with_name(out.name + ".partial").exists()
    # the rows are chat training data; an unfinished reply trains without the end-of-turn token
    data = TextDataModule(
        str(out), val_files=str(out), tokenizer=str(chat_model), block_size=256, batch_size=2,
        cache_dir=str(cache_dir),
    )  # fmt: skip
    data.setup()
    blocks = data.datasets["train"]
    batch = default_collate([blocks[i] for i in range(len(blocks))])
    last_reply = {}  # conversation -> its last reply's tokens (replies come in order)
    for row, _, start, stop in assistant_replies(batch).tolist():
        last_reply[int(blocks.documents[row, start])] = batch["input_ids"][row, start:stop].tolist()
    assert sorted(last_reply) == [0, 1, 2, 3, 4]
    for conversation, reply in last_reply.items():
        assert (reply[-1] == end) == (finish[conversation] == "stop")


def test_replies_stop_at_the_end_of_turn_token_and_are_prompted_as_training_prompts(chat_model, cache_dir):
    model, tokenizer = load_model_and_tokenizer(str(chat_model))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = [THREE_TURNS[:2], THREE_TURNS[:4], [{"role": "user", "content": "Hi"}]]
    template = tokenizer.chat_template
    prompts = prompt_ids(tokenizer, template, conversations)
    threshold = max(len(p) for p in prompts) + 2
    ending_at(model, end, position=threshold)
    replies = generate_replies(
        model, tokenizer, conversations, template=template, temperature=0.9, generator=torch.Generator(),
        max_new_tokens=threshold - min(len(p) for p in prompts) + 2,
    )  # fmt: skip
    for prompt, reply in zip(prompts, replies, strict=True):
        assert reply.finished and reply.tokens[-1] == end and end not in reply.tokens[:-1]
        assert len(reply.tokens) == threshold - len(prompt) + 2  # each row stops at its own step
        assert reply.text == tokenizer.decode(reply.tokens[:-1], skip_special_tokens=True).strip()
    # the prompt is what training gives the model before the reply it learns
    rendered = tokenizer.apply_chat_template(conversations[1], tokenize=False, add_generation_prompt=True)
    assert prompts[1] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_an_interrupted_run_continues_after_its_rows_and_ends_as_an_uninterrupted_one(
    chat_model, prompts, tmp_path, monkeypatch
):
    options = {"prompts": str(prompts), "chat": True, "max_new_tokens": 5, "batch_size": 2, "seed": 3}
    whole = read_rows(generate(str(chat_model), str(tmp_path / "whole.jsonl"), **options))

    out = tmp_path / "answers.jsonl"
    real, calls = generate_command.generate_replies, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_command, "generate_replies", interrupted)
    with pytest.raises(RunInterrupted, match="2 of 5 conversations"):
        generate(str(chat_model), str(out), **options)
    monkeypatch.setattr(generate_command, "generate_replies", real)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(read_rows(partial)) == 2
    with pytest.raises(ConfigError, match=r"another temperature \(1.0, now 0.5\)"):
        generate(str(chat_model), str(out), **options, temperature=0.5)
    with partial.open("a") as file:
        file.write('{"messages": [{"role": "us')  # a row torn by the interruption
    generate(str(chat_model), str(out), **options)
    assert read_rows(out) == whole  # no row twice, none missing, the same draws
    assert not partial.exists() and not out.with_name(out.name + ".partial.json").exists()


def test_the_command_line_takes_chat_as_a_bare_flag(chat_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is two plus two?\nThanks!\n")
    out = tmp_path / "answers.jsonl"
    run_cli("generate", "--model", str(chat_model), "--prompts", str(prompts), "--chat",
            "--max_new_tokens", "4", "--output_file", str(out))  # fmt: skip
    rows = read_rows(out)
    assert [row["messages"][0] for row in rows] == [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "user", "content": "Thanks!"},
    ]


@pytest.mark.parametrize(
    "row,match",
    [
        ({"messages": THREE_TURNS[:3]}, "ends with an assistant turn"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "not a known role"),
        ({"id": 7}, "has no text in 'prompt'"),
    ],
)
def test_bad_prompt_rows_are_named_by_file_and_line(chat_model, tmp_path, row, match):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [PROMPTS[0], row])
    with pytest.raises(ConfigError, match=f"prompts.jsonl:2.*{match}"):
        generate(str(chat_model), str(tmp_path / "out.jsonl"), prompts=str(prompts), chat=True)


def test_a_conversation_without_chat_and_chat_without_prompts_are_refused(chat_model, prompts, tmp_path):
    with pytest.raises(ConfigError, match="pass --chat true"):
        generate(str(chat_model), str(tmp_path / "out.jsonl"), prompts=str(prompts))
    with pytest.raises(ConfigError, match="is needed with --chat"):
        generate(str(chat_model), str(tmp_path / "out.jsonl"), chat=True)
