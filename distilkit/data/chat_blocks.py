"""Conversations packed into blocks whose attention never crosses a conversation.

Each block of ``block_size`` tokens holds whole conversations side by side (best fit, longest first),
then padding. Positions restart at 0 at every conversation (``position_ids``), and so does the padding,
which forms a sequence of its own: a model that reads its attention from the positions (every
transformers model distilkit runs; :mod:`distilkit.models.packing`) sees each conversation exactly as it
would alone. A conversation's first token is never a target (nothing before it is visible).

A conversation longer than ``block_size`` is truncated to its first ``block_size`` tokens: the start of
a conversation is the context every later reply depends on, and a tail cut off on its own would train
replies on prompts the model never sees. What truncation drops is counted in a :class:`PackingReport`
(the data module prints its line at setup); a conversation left with no target at all is dropped whole
(counted too).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from distilkit.batch import IGNORE_INDEX


@dataclass(frozen=True)
class PackingReport:
    """What packing one split kept and dropped.

    Attributes:
        split: ``train``, ``val``, ...
        train_on: ``assistant`` or ``all``.
        conversations: conversations in the split.
        blocks: blocks made.
        block_size: T.
        tokens: tokens placed in blocks (padding excluded).
        targets: target tokens placed in blocks.
        truncated: conversations longer than T (truncated, or dropped when nothing was left to train on).
        dropped_conversations: conversations left out (no target within their first T tokens).
        dropped_targets: target tokens cut off by truncation (dropped conversations included).
    """

    split: str
    train_on: str
    conversations: int
    blocks: int
    block_size: int
    tokens: int
    targets: int
    truncated: int
    dropped_conversations: int
    dropped_targets: int

    def line(self) -> str:
        """One line for the log."""
        what = "assistant tokens" if self.train_on == "assistant" else "tokens"
        filled = self.tokens / max(self.blocks * self.block_size, 1)
        text = (
            f"chat data, {self.split}: {self.conversations:,} conversations in {self.blocks:,} blocks of "
            f"{self.block_size} tokens ({filled:.1%} filled), training on {self.targets:,} {what} "
            f"(data.train_on: {self.train_on})"
        )
        if self.truncated:
            total = self.targets + self.dropped_targets
            text += (
                f"; {self.truncated:,} conversations longer than data.block_size={self.block_size} "
                f"truncated: {self.dropped_targets:,} of {total:,} {what} dropped "
                f"({self.dropped_targets / max(total, 1):.2%})"
            )
            if self.dropped_conversations:
                text += f", {self.dropped_conversations:,} conversations left with none dropped whole"
        return text


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity``: longest first, each into the fullest bin it fits (best fit
    decreasing). Returns each bin's item indices; deterministic (ties broken by index)."""
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> bins with that room
    rooms: list[int] = []  # sorted rooms that have bins
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[item]
        at = bisect.bisect_left(rooms, length)
        if at == len(rooms):
            target, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[at]
            target = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[at]
        bins[target].append(item)
        left = room - length
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(target)
    return bins


class ChatBlocks(Dataset):
    """Packed conversations in the Hugging Face causal-LM convention, one block per item.

    Item ``i`` is ``input_ids``, ``attention_mask`` (1 on conversation tokens, 0 on padding), ``labels``
    (the inputs where they are targets, -100 elsewhere), ``position_ids`` (restarting at 0 at each
    conversation and at the padding), ``assistant_mask`` (true on the assistant's tokens whatever
    ``train_on`` says: where each reply starts and ends, for sampling replies), each ``(T,)``, and
    ``block_index`` ``()``.

    Args:
        ids: ``(tokens,)`` every conversation's token ids, one after another.
        assistant: ``(tokens,)`` 1 on the assistant's tokens.
        offsets: ``(conversations + 1,)`` where each conversation starts in ``ids`` (and the end).
        block_size: T.
        pad_id: the id written into padding.
        train_on: ``assistant`` (targets: the assistant's tokens) or ``all`` (every token but the first).
        split: the split's name, for the report.
    """

    def __init__(
        self,
        ids: np.ndarray,
        assistant: np.ndarray,
        offsets: np.ndarray,
        block_size: int,
        pad_id: int,
        train_on: str,
        split: str = "train",
    ) -> None:
        self.block_size = block_size
        lengths = np.diff(offsets)
        target = assistant.astype(bool) if train_on == "assistant" else np.ones(len(ids), dtype=bool)
        target[offsets[:-1][lengths > 0]] = False  # a conversation's first token: nothing to predict it from
        kept = np.minimum(lengths, block_size)
        running = np.concatenate([[0], np.cumsum(target)])  # (tokens + 1,) targets before each token
        total_targets = int(running[-1])
        use = np.flatnonzero(running[offsets[:-1] + kept] - running[offsets[:-1]] > 0)
        blocks = best_fit(kept[use].tolist(), block_size)
        shape = (len(blocks), block_size)
        tokens = np.full(shape, pad_id, dtype=np.int64)  # (n_blocks, T)
        valid, targets, replies = (np.zeros(shape, dtype=bool) for _ in range(3))
        ramp = np.arange(block_size, dtype=np.int32)
        positions = np.tile(ramp, (len(blocks), 1))  # (n_blocks, T)
        self.documents = np.full(shape, -1, dtype=np.int64)
        for row, members in enumerate(blocks):
            at = 0
            for member in members:
                doc = int(use[member])
                start, n = int(offsets[doc]), int(kept[doc])
                source, piece = slice(start, start + n), slice(at, at + n)
                tokens[row, piece] = ids[source]
                valid[row, piece] = True
                targets[row, piece] = target[source]
                replies[row, piece] = assistant[source]
                positions[row, piece] = ramp[:n]
                self.documents[row, piece] = doc
                at += n
            positions[row, at:] = ramp[: block_size - at]  # the padding: a sequence of its own
        self.tokens, self.valid = torch.from_numpy(tokens), torch.from_numpy(valid)
        self.targets, self.assistant = torch.from_numpy(targets), torch.from_numpy(replies)
        self.positions = torch.from_numpy(positions)
        self.report = PackingReport(
            split=split,
            train_on=train_on,
            conversations=len(lengths),
            blocks=len(blocks),
            block_size=block_size,
            tokens=int(self.valid.sum()),
            targets=int(self.targets.sum()),
            truncated=int((lengths > block_size).sum()),
            dropped_conversations=int(len(lengths) - len(use)),
            dropped_targets=total_targets - int(self.targets.sum()),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[index]
        return {
            "input_ids": ids,
            "attention_mask": self.valid[index].long(),
            "labels": torch.where(self.targets[index], ids, torch.full_like(ids, IGNORE_INDEX)),
            "position_ids": self.positions[index].long(),
            "assistant_mask": self.assistant[index],
            "block_index": torch.tensor(index, dtype=torch.long),
        }

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """The conversation index of each position ``block * T + t`` (-1 on padding)."""
        return self.documents.reshape(-1)[positions]
