"""OnPolicyDistillationModule on chat data: each reply's prompt is the conversation before it, a sampled
reply stops at the template's end-of-turn token, and only the reply is trained on."""

from __future__ import annotations

import pytest
import torch
from helpers import THREE_TURNS, chat_tokenizer, tiny_module, tiny_trainer, write_jsonl
from torch.utils.data import default_collate

from distilkit import OnPolicyDistillationModule, TextDataModule
from distilkit.batch import IGNORE_INDEX, assistant_replies
from distilkit.modules.on_policy import training_batch

TINY_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
}
CONVERSATIONS = [
    THREE_TURNS,
    THREE_TURNS[1:5],
    [{"role": "user", "content": "How are you today?"}, {"role": "assistant", "content": "Fine, thank you."}],
    [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
] * 2


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> TextDataModule:
    """Eight conversations (fourteen replies) with a SmolLM2-style tokenizer, in blocks of 256 tokens."""
    root = tmp_path_factory.mktemp("on-policy-chat")
    chat_tokenizer("llama", root / "tokenizer")
    rows = write_jsonl(root / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = TextDataModule(
        str(rows),
        val_files=str(rows),
        tokenizer=str(root / "tokenizer"),
        block_size=256,
        batch_size=2,
        cache_dir=str(root / "cache"),
    )
    data.setup()
    return data


def chat_module(data: TextDataModule, **kwargs) -> OnPolicyDistillationModule:
    options = {"max_new_tokens": 8, "val_samples": 3, "seed": 0} | kwargs
    return tiny_module(data, TINY_LLAMA, TINY_LLAMA, cls=OnPolicyDistillationModule, **options)


def whole_split(data: TextDataModule) -> dict[str, torch.Tensor]:
    return default_collate([data.datasets["train"][i] for i in range(len(data.datasets["train"]))])


def test_each_reply_is_prompted_with_the_conversation_before_it(chat_data):
    module = chat_module(chat_data, prompt_tokens=4)  # prompt_tokens is for plain text only
    batch = whole_split(chat_data)
    ids, mask = module.prompts(batch)
    replies = assistant_replies(batch)
    assert ids.shape[0] == len(replies) == 14
    assert bool((mask.diff(dim=1) >= 0).all()) and bool(mask[:, -1].all())  # left-padded
    tokenizer = chat_data.tokenizer
    expected = {
        tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        for messages in CONVERSATIONS
        for turn, message in enumerate(messages)
        if message["role"] == "assistant"
    }
    found = {tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask, strict=True)}
    assert found == expected
    for (row, start, end, _), prompt, m in zip(replies.tolist(), ids, mask, strict=True):
        assert torch.equal(prompt[m.bool()], batch["input_ids"][row, start:end])


def test_a_sampled_reply_stops_at_the_end_of_turn_token_and_only_it_is_trained(chat_data):
    module = chat_module(chat_data).eval()
    batch = whole_split(chat_data)
    prompts, prompt_mask = module.prompts(batch)
    module.end_of_turn_id = module.eos_token_id = None
    free = module.sample(batch, module.sampling_generator("test")).new_tokens  # (R, 8): nothing stops
    end = int(free[0, 2])
    module.end_of_turn_id = end  # row 0 now ends at its third token; the draws before are the same
    assert module.stop_token_ids(batch) == [end]
    trained = training_batch(module.sample(batch, module.sampling_generator("test")))

    for row in range(free.shape[0]):
        hits = (free[row] == end).nonzero()
        length = int(hits[0]) + 1 if len(hits) else free.shape[1]  # through the end-of-turn token
        prompt = prompts[row][prompt_mask[row].bool()]
        assert torch.equal(trained["input_ids"][row, : len(prompt)], prompt)
        labels = trained["labels"][row]
        assert torch.equal(labels[labels != IGNORE_INDEX], free[row, :length])
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()
    assert int((trained["labels"][0] != IGNORE_INDEX).sum()) == 3


def test_an_on_policy_fit_on_chat_samples_replies_and_scores_them(chat_data, tmp_path):
    module = chat_module(chat_data, lmbda=1.0)
    trainer = tiny_trainer(
        tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=2, check_val_every_n_epoch=None
    )
    trainer.fit(module, datamodule=chat_data)
    assert module.end_of_turn_id == chat_data.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert module.end_of_turn_id == chat_data.end_of_turn_id
    metrics = trainer.callback_metrics
    assert float(metrics["train/on_policy"]) == 1.0
    assert float(metrics["val/sample_teacher_nll"]) > 0
    assert 0 < float(metrics["val/sample_distinct2"]) <= 1
