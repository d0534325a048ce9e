"""Conversations as training data: rendering, the assistant's tokens, packing, truncation and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GPT2_TEMPLATE, THREE_TURNS, chat_tokenizer, write_jsonl
from torch.utils.data import default_collate

from distilkit import TextDataModule
from distilkit.batch import IGNORE_INDEX, assistant_replies
from distilkit.data.chat_blocks import ChatBlocks, best_fit
from distilkit.errors import ConfigError

OTHER = [
    {"role": "user", "content": "How are you today?"},
    {"role": "assistant", "content": "Fine, thank you for asking."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of the three tokenizers (SmolLM2-style Llama, Qwen2, GPT-2), trained here."""
    root = tmp_path_factory.mktemp("chat-tokenizers")
    for kind in ("llama", "qwen2", "gpt2"):
        chat_tokenizer(kind, root / kind)
    return {kind: root / kind for kind in ("llama", "qwen2", "gpt2")}


def chat_data(
    tmp_path: Path, tokenizer: Path | dict, rows: list, cache_dir: Path, **kwargs
) -> TextDataModule:
    """A set-up data module over ``rows`` (train and validation files alike)."""
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    options = {"block_size": 256, "batch_size": 2, "cache_dir": str(cache_dir)} | kwargs
    spec = tokenizer if isinstance(tokenizer, dict) else str(tokenizer)
    data = TextDataModule(str(path), val_files=str(path), tokenizer=spec, **options)
    data.setup()
    return data


# ------------------------------------------------------------------------------------ the hand computation
def chatml_pieces(messages: list[dict], default_system: str | None = None) -> list[tuple[str, bool]]:
    """ChatML written out by hand, each piece marked trained or not: the assistant's content and its
    ``<|im_end|>``, never the ``<|im_start|>assistant\\n`` header or the newline after the turn."""
    pieces = []
    if default_system is not None and messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for message in messages:
        pieces.append((f"<|im_start|>{message['role']}\n", False))
        if message["role"] == "assistant":
            pieces += [(message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((message["content"] + "<|im_end|>\n", False))
    return pieces


def gpt2_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    """:data:`GPT2_TEMPLATE` by hand: the generation prompt is ``Assistant:``, so the space after it is
    the reply's first character; the reply ends with ``<|endoftext|>``."""
    pieces = []
    for message in messages:
        if message["role"] == "assistant":
            pieces += [
                ("Assistant:", False),
                (" " + message["content"] + "<|endoftext|>", True),
                ("\n\n", False),
            ]
        else:
            pieces.append((f"{message['role'].capitalize()}: {message['content']}\n\n", False))
    return pieces


def hand_labels(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[str, list[int]]:
    """The rendered text and its labels: a token is a target when its characters fall in a trained piece.
    Checks that the trained tokens cover exactly the trained pieces' characters (none straddles a
    boundary)."""
    text = "".join(piece for piece, _ in pieces)
    trained = np.zeros(len(text), dtype=bool)
    at = 0
    for piece, is_trained in pieces:
        trained[at : at + len(piece)] = is_trained
        at += len(piece)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if trained[start:end].any() else IGNORE_INDEX
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]
    covered = np.zeros(len(text), dtype=bool)  # the characters of the trained tokens
    for label, (start, end) in zip(labels, encoding["offset_mapping"], strict=True):
        covered[start:end] |= label != IGNORE_INDEX
    assert (covered == trained).all()
    return text, labels


def labels_of(data: TextDataModule, conversation: int, split: str = "train") -> list[int]:
    blocks = data.datasets[split]
    assert isinstance(blocks, ChatBlocks)
    row, columns = np.nonzero(blocks.documents == conversation)
    return blocks[int(row[0])]["labels"][columns].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_the_loss_mask_of_three_turns_is_the_hand_computation(kind, tokenizers, tmp_path, cache_dir):
    template = {"chat_template": GPT2_TEMPLATE} if kind == "gpt2" else {}
    data = chat_data(
        tmp_path, tokenizers[kind], [{"messages": THREE_TURNS}, {"messages": OTHER}], cache_dir, **template
    )
    pieces = gpt2_pieces(THREE_TURNS) if kind == "gpt2" else chatml_pieces(THREE_TURNS)
    text, expected = hand_labels(data.tokenizer, pieces)
    assert data.tokenizer.apply_chat_template(THREE_TURNS, tokenize=False) == text
    assert labels_of(data, 0) == expected
    assert sum(label != IGNORE_INDEX for label in expected) > 3 * 2  # every turn's reply, each > 1 token
    other_text, other = hand_labels(
        data.tokenizer,
        gpt2_pieces(OTHER)
        if kind == "gpt2"
        else chatml_pieces(
            OTHER,
            "You are a helpful assistant."
            if kind == "qwen2"
            else "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        ),
    )
    assert labels_of(data, 1) == other  # the template's default system turn is not trained on either


def test_train_on_all_trains_every_token_but_each_conversations_first(tokenizers, tmp_path, cache_dir):
    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    data = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir, train_on="all")
    ids = data.tokenizer.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=False)
    assert labels_of(data, 0) == [IGNORE_INDEX, *list(ids)[1:]]


def test_prompt_and_completion_rows_are_a_user_turn_and_an_assistant_turn(tokenizers, tmp_path, cache_dir):
    rows = [
        {"prompt": "What is two plus two?", "completion": "Four."},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Yes"}],
        },
    ]
    data = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir)
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
    _, expected = hand_labels(data.tokenizer, chatml_pieces(messages, "You are a helpful assistant."))
    assert labels_of(data, 0) == expected


# ------------------------------------------------------------------------------------------------ packing
def test_conversations_are_packed_whole_with_positions_restarting(tokenizers, tmp_path, cache_dir):
    rows = [{"messages": THREE_TURNS}] + [{"messages": OTHER}] * 9
    data = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir, block_size=160)
    blocks = data.datasets["train"]
    assert isinstance(blocks, ChatBlocks)
    lengths = [
        len(data.tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows
    ]
    assert len(blocks) == len(best_fit(lengths, 160)) < len(rows)  # several conversations share a block
    seen = set()
    for index in range(len(blocks)):
        item = blocks[index]
        documents = blocks.documents[index]
        for document in set(documents.tolist()) - {-1}:
            where = np.flatnonzero(documents == document)
            assert (np.diff(where) == 1).all()  # contiguous, in one block only
            assert document not in seen
            seen.add(document)
            assert item["position_ids"][where].tolist() == list(range(len(where)))
            assert item["labels"][where[0]] == IGNORE_INDEX
            assert len(where) == lengths[document]
        padding = np.flatnonzero(documents == -1)
        assert item["attention_mask"][padding].sum() == 0 and (item["labels"][padding] == IGNORE_INDEX).all()
        assert item["position_ids"][padding].tolist() == list(range(len(padding)))  # a sequence of its own
    assert seen == set(range(len(rows)))
    report = data.packing_reports["train"]
    assert (report.conversations, report.blocks, report.truncated, report.dropped_targets) == (
        10,
        len(blocks),
        0,
        0,
    )


def test_best_fit_packs_longest_first_into_the_fullest_bin_that_fits():
    assert best_fit([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert best_fit([8, 8], 8) == [[0], [1]]
    assert best_fit([], 8) == []


def test_a_conversation_longer_than_a_block_is_truncated_and_what_it_drops_is_counted(
    tokenizers, tmp_path, cache_dir
):
    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    full = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir)
    targets = [sum(label != IGNORE_INDEX for label in labels_of(full, i)) for i in range(2)]
    lengths = [
        len(full.tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows
    ]
    block = lengths[0] - 20  # cuts into the last reply of the first conversation only
    with pytest.warns(
        UserWarning, match=r"1 conversations longer than data.block_size=\d+ truncated: \d+ of"
    ):
        short = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir, block_size=block)
    report = short.packing_reports["train"]
    kept = sum(label != IGNORE_INDEX for label in labels_of(short, 0))
    assert report.truncated == 1 and report.dropped_conversations == 0
    assert report.dropped_targets == targets[0] - kept > 0
    assert report.targets + report.dropped_targets == sum(targets)
    assert labels_of(short, 0) == labels_of(full, 0)[:block]


def test_a_conversation_left_without_targets_is_dropped_and_counted(tokenizers, tmp_path, cache_dir):
    long_system = [{"role": "system", "content": "You answer in one line. " * 20}, *OTHER]
    rows = [{"messages": long_system}, {"messages": OTHER}]
    full = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir, block_size=1024)
    targets = [sum(label != IGNORE_INDEX for label in labels_of(full, i)) for i in range(2)]
    block = len(labels_of(full, 1)) + 8  # the second fits, the first's system turn alone is longer
    with pytest.warns(UserWarning, match="1 conversations left with none dropped whole"):
        data = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir, block_size=block)
    report = data.packing_reports["train"]
    assert (report.truncated, report.dropped_conversations, report.dropped_targets) == (1, 1, targets[0])
    assert set(data.datasets["train"].documents.ravel().tolist()) == {-1, 1}


# ------------------------------------------------------------------------------------- replies and batches
def test_batches_carry_each_reply_and_the_prompt_before_it(tokenizers, tmp_path, cache_dir):
    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    data = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir)
    batch = default_collate([data.datasets["train"][i] for i in range(len(data.datasets["train"]))])
    tokenizer = data.tokenizer
    found = {}
    for row, prompt_start, start, end in assistant_replies(batch).tolist():
        prompt = tokenizer.decode(batch["input_ids"][row, prompt_start:start])
        found[prompt] = tokenizer.decode(batch["input_ids"][row, start:end])
    turns = [i for i, m in enumerate(THREE_TURNS) if m["role"] == "assistant"]
    for turn in turns:
        prompt = tokenizer.apply_chat_template(THREE_TURNS[:turn], tokenize=False, add_generation_prompt=True)
        assert found[prompt] == THREE_TURNS[turn]["content"] + "<|im_end|>"
    assert len(found) == len(turns) + 1
    assert data.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_the_end_of_turn_of_a_template_without_a_marker_is_eos(tokenizers, tmp_path, cache_dir):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}{% endfor %}"
    template += "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    data = chat_data(tmp_path, tokenizers["gpt2"], rows, cache_dir, chat_template=template)
    assert data.end_of_turn_id == data.eos_token_id
    gpt2 = chat_data(tmp_path, tokenizers["gpt2"], rows, cache_dir, chat_template=GPT2_TEMPLATE)
    assert gpt2.end_of_turn_id == gpt2.tokenizer.convert_tokens_to_ids("<|endoftext|>")


# ------------------------------------------------------------------------------------------ the template
def test_a_template_comes_from_the_recipe_as_text_or_a_file_and_travels_with_the_tokenizer(
    tokenizers, tmp_path, cache_dir
):
    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    path = tmp_path / "template.jinja"
    path.write_text(GPT2_TEMPLATE)
    from_file = chat_data(tmp_path, tokenizers["gpt2"], rows, cache_dir, chat_template=str(path))
    from_text = chat_data(tmp_path, tokenizers["gpt2"], rows, cache_dir, chat_template=GPT2_TEMPLATE)
    assert labels_of(from_file, 0) == labels_of(from_text, 0)
    assert from_file.identity() == from_text.identity()
    assert from_file.tokenizer.chat_template == GPT2_TEMPLATE  # saved with checkpoints and exports
    other = chat_data(
        tmp_path, tokenizers["gpt2"], rows, cache_dir, chat_template=GPT2_TEMPLATE.replace(":", " >")
    )
    assert other.identity()["chat_template"] != from_text.identity()["chat_template"]


def test_plain_text_keeps_its_identity_and_blocks(corpus, tokenizer_dir, cache_dir):
    data = TextDataModule(str(corpus), tokenizer=str(tokenizer_dir), block_size=32, cache_dir=str(cache_dir))
    assert not data.chat and data.train_on == "all"
    assert set(data.identity()) == {
        "train_data",
        "val_data",
        "tokenizer",
        "block_size",
        "val_fraction",
        "seed",
    }
    data.setup()
    assert set(data.datasets["train"][0]) == {"input_ids", "attention_mask", "labels", "block_index"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"data.chat_template=None: is not set and the tokenizer .* has no chat template"),
        ({"chat_template": "no/such/template.jinja"}, "is neither Jinja text"),
        ({"chat_template": "{{ messages[0]['content'] | nosuchfilter }}"}, "refused by the chat template"),
        ({"chat_template": GPT2_TEMPLATE, "text_field": "body"}, "data.text_field='body': is set, but"),
        (
            {"chat_template": GPT2_TEMPLATE, "train_on": "assistants"},
            "data.train_on='assistants': is not a choice",
        ),
    ],
)
def test_bad_chat_settings_name_the_field(kwargs, match, tokenizers, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": THREE_TURNS}, {"messages": OTHER}])
    with pytest.raises(ConfigError, match=match):
        TextDataModule(str(path), tokenizer=str(tokenizers["gpt2"]), cache_dir=str(cache_dir), **kwargs)


def test_chat_settings_on_plain_text_and_mixed_data_are_refused(corpus, tokenizers, tmp_path, cache_dir):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": THREE_TURNS}, {"messages": OTHER}])
    tokenizer = str(tokenizers["qwen2"])
    with pytest.raises(ConfigError, match="data.train_on='assistant': needs chat rows"):
        TextDataModule(str(corpus), tokenizer=tokenizer, train_on="assistant", cache_dir=str(cache_dir))
    with pytest.raises(
        ConfigError, match="data.chat_template=.*is set, but data.train_files hold plain text"
    ):
        TextDataModule(
            str(corpus), tokenizer=tokenizer, chat_template=GPT2_TEMPLATE, cache_dir=str(cache_dir)
        )
    with pytest.raises(ConfigError, match="mixes chat rows"):
        TextDataModule([str(chat), str(corpus)], tokenizer=tokenizer, cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match="data.val_files=.*hold another kind of data"):
        TextDataModule(str(chat), val_files=str(corpus), tokenizer=tokenizer, cache_dir=str(cache_dir))


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_row(tokenizers, tmp_path, cache_dir):
    """A template that shortens every assistant turn but the last (as templates that drop earlier reasoning
    do): the rendering through a reply is not how the whole conversation starts."""
    template = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
        "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": OTHER}, {"messages": THREE_TURNS}])
    data = TextDataModule(
        str(path),
        val_files=str(path),
        tokenizer=str(tokenizers["gpt2"]),
        chat_template=template,
        cache_dir=str(cache_dir),
    )
    with pytest.raises(ConfigError, match=rf"data.chat_template='{path}:2': renders turn 2 \(assistant\)"):
        data.setup()


# ---------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant turn to train on"),
        ({"messages": [{"role": "bot", "content": "Hi"}]}, r"has messages\[0\].role='bot', not a known role"),
        ({"messages": "Hi there"}, "has messages='Hi there', not a non-empty list of messages"),
        ({"messages": []}, r"has messages=\[\], not a non-empty list of messages"),
        ({"messages": [{"role": "user"}]}, r"has messages\[0\]=\{'role': 'user'\}"),
        (
            {"messages": [{"role": "user", "content": ["Hi"]}, OTHER[1]]},
            r"has messages\[0\].content of type list, not text",
        ),
        ({"prompt": "Hi", "completion": 3}, "has completion=3, not a non-empty list"),
        ({"text": "plain"}, "has neither 'messages' nor 'prompt' and 'completion'"),
        ({"messages": [OTHER[1], OTHER[0]]}, "opens with an assistant turn"),
        ("not an object", "has neither 'messages'"),
    ],
)
def test_a_bad_row_is_named_by_file_and_line(row, match, tokenizers, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": OTHER}, row])
    data = TextDataModule(
        str(path), val_files=str(path), tokenizer=str(tokenizers["qwen2"]), cache_dir=str(cache_dir)
    )
    with pytest.raises(ConfigError, match=rf"data.train_files='{path}:2': {match}"):
        data.setup()


def test_a_line_that_is_not_json_is_named(tokenizers, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": OTHER}])
    path.write_text(path.read_text() + "{not json\n")
    data = TextDataModule(
        str(path), val_files=str(path), tokenizer=str(tokenizers["qwen2"]), cache_dir=str(cache_dir)
    )
    with pytest.raises(ConfigError, match=rf"'{path}:2': is not a JSON object"):
        data.setup()


def test_rows_without_assistant_turns_train_under_train_on_all(tokenizers, tmp_path, cache_dir):
    rows = [{"messages": [{"role": "user", "content": "Hi there"}]}, {"messages": OTHER}]
    data = chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir, train_on="all")
    assert sum(label != IGNORE_INDEX for label in labels_of(data, 0)) > 0


def test_chat_rows_read_from_parquet_like_jsonl(tokenizers, tmp_path, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    from_parquet = TextDataModule(
        str(tmp_path / "chat.parquet"),
        val_files=str(tmp_path / "chat.parquet"),
        tokenizer=str(tokenizers["qwen2"]),
        block_size=256,
        cache_dir=str(cache_dir),
    )
    from_parquet.setup()
    assert labels_of(from_parquet, 0) == labels_of(
        chat_data(tmp_path, tokenizers["qwen2"], rows, cache_dir), 0
    )


# ------------------------------------------------------------------------------------- the real SmolLM2
SMOLLM2 = Path(__file__).parents[2] / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.real_model
def test_the_loss_mask_with_the_real_smollm2_tokenizer(tmp_path, cache_dir):
    from transformers import AutoTokenizer

    if not SMOLLM2.is_file():
        pytest.skip("recipes/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is absent: `make smollm2` downloads it")
    gguf = SMOLLM2
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp_path / "smollm2")
    rows = [{"messages": THREE_TURNS}, {"messages": OTHER}]
    data = chat_data(tmp_path, tmp_path / "smollm2", rows, cache_dir)
    _, expected = hand_labels(data.tokenizer, chatml_pieces(THREE_TURNS))
    assert labels_of(data, 0) == expected
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert labels_of(data, 1) == hand_labels(data.tokenizer, chatml_pieces(OTHER, default))[1]
    assert data.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert torch.equal(
        torch.tensor(data.tokenizer.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=False)),
        data.datasets["train"].tokens[np.nonzero(data.datasets["train"].documents == 0)],
    )


# -------------------------------------------------------------------------------------------------- CLI
def chat_recipe(tmp_path: Path, cache_dir: Path, rows: list, **data) -> Path:
    """A tiny distillation recipe over chat rows with a BPE trained here and the recipe's template."""
    import yaml
    from helpers import tiny_recipe

    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = tiny_recipe(tmp_path / "chat.yaml", path, {"vocab_size": 320}, cache_dir)
    config = yaml.safe_load(recipe.read_text())
    config["data"]["init_args"] |= {"val_files": str(path), "block_size": 128, "batch_size": 2}
    config["data"]["init_args"] |= {"chat_template": GPT2_TEMPLATE} | data
    recipe.write_text(yaml.safe_dump(config))
    return recipe


@pytest.mark.slow
def test_distilkit_fit_trains_on_chat_rows(tmp_path, cache_dir, lightning_log):
    from helpers import csv_rows, fit_run, run_cli

    rows = [{"messages": THREE_TURNS[: 2 * n + 1]} for n in (1, 2, 3)] + [{"messages": OTHER}] * 3
    fit_run(chat_recipe(tmp_path, cache_dir, rows), tmp_path / "run")
    assert any(val is not None for _, _, val in csv_rows(tmp_path / "run"))
    assert "chat data, train: 6 conversations" in lightning_log.text  # the line printed at setup
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert GPT2_TEMPLATE in checkpoint["distilkit"]["tokenizer_files"].values()  # saved with the run

    recipe = tmp_path / "chat.yaml"
    run_cli(
        "predict",
        "--config",
        str(recipe),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--ckpt_path",
        "last",
    )
    predictions = (tmp_path / "run" / "predict" / "predictions.jsonl").read_text().splitlines()
    data = chat_data(
        tmp_path, {"vocab_size": 320}, rows, cache_dir, block_size=128, chat_template=GPT2_TEMPLATE
    )
    targets = [sum(label != IGNORE_INDEX for label in labels_of(data, d, "val")) for d in range(6)]
    assert [(row["document"], row["tokens"]) for row in map(json.loads, predictions)] == list(
        enumerate(targets)
    )


def test_distilkit_fit_refuses_a_bad_chat_row_in_one_line(tmp_path, cache_dir, capsys):
    from helpers import fit_run

    rows = [{"messages": OTHER}, {"messages": [{"role": "robot", "content": "beep"}, OTHER[1]]}]
    with pytest.raises(SystemExit) as exit_info:
        fit_run(chat_recipe(tmp_path, cache_dir, rows), tmp_path / "run")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: data.train_files='{tmp_path / 'chat.jsonl'}:2': has messages[0].role='robot'" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
