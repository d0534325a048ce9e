"""A reply cut off at ``max_new_tokens`` (``finish_reason: length``) trains on its content, not on the
end-of-turn token the template writes after it."""

from __future__ import annotations

from helpers import THREE_TURNS, chat_tokenizer, write_jsonl

from distilkit import TextDataModule
from distilkit.batch import IGNORE_INDEX


def test_an_unfinished_reply_trains_without_its_end_of_turn_token(tmp_path, cache_dir):
    chat_tokenizer("qwen2", tmp_path / "tokenizer")
    rows = [{"messages": THREE_TURNS, "finish_reason": reason} for reason in ("stop", "length")]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = TextDataModule(
        str(path), val_files=str(path), tokenizer=str(tmp_path / "tokenizer"), block_size=256,
        batch_size=1, cache_dir=str(cache_dir),
    )  # fmt: skip
    data.setup()
    blocks = data.datasets["train"]
    labels = {}
    for conversation in (0, 1):
        row, columns = (blocks.documents == conversation).nonzero()
        item = blocks[int(row[0])]
        labels[conversation] = item["labels"][columns].tolist()
    finished, unfinished = labels[0], labels[1]
    end = data.end_of_turn_id
    trained = [i for i, label in enumerate(finished) if label != IGNORE_INDEX]
    assert finished[trained[-1]] == end  # the last reply ends its turn
    assert unfinished == [IGNORE_INDEX if i == trained[-1] else label for i, label in enumerate(finished)]
    assert sum(label == end for label in unfinished) == 2  # the earlier replies keep theirs
