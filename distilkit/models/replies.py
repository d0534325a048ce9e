"""An assistant's reply to conversations, sampled through the chat template.

A conversation (a list of ``{role, content}`` ending with a user turn) is rendered with the chat template
and its generation prompt (``<|im_start|>assistant\\n`` for ChatML), exactly as training renders the
conversation before a reply (:mod:`distilkit.data.chat`), and the model continues it until it writes
the template's end-of-turn token (``<|im_end|>``; the EOS id for a template without a marker) or
``max_new_tokens``. Replies of a batch are sampled together with one key-value cache
(:func:`~distilkit.models.generation.sample_tokens`); each row samples what it would alone.

What the command ``distilkit generate --chat`` writes and what ``benchmarks/real_teacher.py`` scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distilkit.data.chat import end_of_turn_id, render
from distilkit.models.generation import left_pad, sample_tokens

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Reply:
    """One sampled reply.

    Attributes:
        text: the reply's text (special tokens dropped, outer white space stripped).
        tokens: the sampled token ids, the end-of-turn token last when there is one.
        finished: whether the model ended its turn (an end-of-turn token) before ``max_new_tokens``.
    """

    text: str
    tokens: list[int]
    finished: bool


def stop_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """The tokens that end a reply: the template's end-of-turn token and the tokenizer's EOS (once each)."""
    ids = [end_of_turn_id(tokenizer, template), tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, template: str, conversations: Sequence[Messages]
) -> list[list[int]]:
    """Each conversation rendered with the generation prompt and tokenized (no special tokens added: the
    template writes its own), as training tokenizes the conversation before a reply."""
    texts = [
        render(
            tokenizer, template, list(messages), "prompts", f"conversation {i}", add_generation_prompt=True
        )
        for i, messages in enumerate(conversations)
    ]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def generate_replies(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    *,
    template: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> list[Reply]:
    """Sample the assistant's next turn of each conversation, in one batch.

    Args:
        model: a causal LM with a Hugging Face forward and a key-value cache.
        tokenizer: its tokenizer.
        conversations: each a list of ``{role, content}`` ending with the turn the reply answers.
        template: the chat template (Jinja text) both the prompts and the stop token come from.
        max_new_tokens: tokens sampled at most per reply (capped by the context length).
        temperature, top_p, greedy, generator: as :func:`~distilkit.models.generation.sample_tokens`.

    Returns:
        One :class:`Reply` per conversation, in order.
    """
    ends = stop_ids(tokenizer, template)
    rows = prompt_ids(tokenizer, template, conversations)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    input_ids, attention_mask = left_pad(rows, pad, next(model.parameters()).device)
    sampled = sample_tokens(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        eos_token_id=ends,
        pad_token_id=pad,
        generator=generator,
    )
    new = sampled.new_tokens.masked_fill(~sampled.generated_mask[:, sampled.prompt_length :], -1)  # (B, N)
    return [_reply(tokenizer, row, ends) for row in new.tolist()]


def _reply(tokenizer: PreTrainedTokenizerBase, row: list[int], ends: list[int]) -> Reply:
    tokens = [t for t in row if t >= 0]  # the sampled tokens, through the end-of-turn token
    finished = bool(tokens) and tokens[-1] in ends
    text = tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence decodes to one string
    return Reply(text=text.strip(), tokens=tokens, finished=finished)
