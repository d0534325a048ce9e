"""Sampling text from a causal LM: the one place distilkit generates (the ``generate`` command, the samples
table of a run).

One rule for the length: at most ``max_new_tokens``, and never past the model's context
(``max_position_embeddings``) after the prompt; a prompt that already fills the context is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distilkit.errors import ConfigError


def context_length(model: nn.Module) -> int:
    """The model's maximum positions (its config's ``max_position_embeddings``), or a large number."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 10**9)


def generate_text(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> list[str]:
    """Continue each prompt (an empty prompt starts from EOS: unconditional) and return the continuations.

    The prompts are left-padded into one batch; the model is sampled in eval mode under ``no_grad`` and
    put back in its previous mode. Sampling draws from the global torch generator (seed it to reproduce).
    """
    texts = [prompt if prompt else tokenizer.eos_token for prompt in prompts]
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_length = encoded["input_ids"].shape[1]
    budget = min(max_new_tokens, context_length(model) - prompt_length)
    if budget < 1:
        raise ConfigError(
            "prompts",
            f"a prompt of {prompt_length} tokens",
            f"fills the model's context of {context_length(model)} tokens",
            "shorten the prompts",
        )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **encoded,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            max_new_tokens=budget,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    model.train(was_training)
    new_tokens = output[:, prompt_length:]  # (B, new)
    return [str(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in new_tokens]
