"""The peers of a cohort: loading them, the logit width they share, and settings given one per peer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distilkit.errors import ConfigError
from distilkit.models.loading import ModelSpec, check_context, load_causal_lm, vocab_rows


def load_peers(
    specs: Sequence[ModelSpec], *, vocab_size: int | None, block_size: int | None, eos_token_id: int | None
) -> list[nn.Module]:
    """Every peer in float32 and train mode; config mappings get the tokenizer's vocabulary size, ids and
    ``block_size`` positions where they leave them out (as the student of a distillation does)."""
    defaults = {"vocab_size": vocab_size, "max_position_embeddings": block_size}
    defaults |= {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    models = []
    for index, spec in enumerate(specs):
        field = f"model.peers[{index}]"
        model = load_causal_lm(spec, field=field, dtype=torch.float32, defaults=defaults)
        check_context(field, model, block_size)
        models.append(model.train())  # from_pretrained returns eval-mode models
    return models


def cohort_vocab_size(models: Sequence[nn.Module], tokenizer_size: int | None) -> int:
    """The logit width the peers are compared on: their head size when all agree, else the tokenizer's
    (rows beyond it are padding); every peer must cover the tokenizer."""
    rows = [vocab_rows(model) for model in models]
    for index, width in enumerate(rows):
        if tokenizer_size is not None and tokenizer_size > width:
            raise ConfigError(
                f"model.peers[{index}]",
                f"vocabulary of {width}",
                f"is smaller than the tokenizer's {tokenizer_size}",
                "leave vocab_size out of its config mapping (the tokenizer's is filled in)",
            )
    if len(set(rows)) == 1:
        return rows[0]
    if tokenizer_size is not None:
        return tokenizer_size
    raise ConfigError("model.peers", rows, "have different vocabulary sizes", "give every peer one tokenizer")


def per_peer(field: str, value: Any, count: int) -> list[Any]:
    """``value`` as one entry per peer: a list must have ``count`` entries; anything else is repeated."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ConfigError(
            field, list(value), f"has {len(value)} entries for {count} peers", "give one per peer"
        )
    return list(value)


def peer_names(names: list[str] | None, count: int) -> list[str]:
    """The peers' names: ``peer0``, ``peer1`` ... unless given (distinct; ``peerN`` only for peer N)."""
    if names is None:
        return [f"peer{i}" for i in range(count)]
    names = per_peer("model.names", names, count)
    clash = [n for i, n in enumerate(names) if re.fullmatch(r"peer\d+", n) and n != f"peer{i}"]
    if len(set(names)) != count or clash:
        raise ConfigError("model.names", names, "must be distinct names", "name each peer once (not peerN)")
    return names


def peer_index(label: str, names: Sequence[str]) -> int | None:
    """The index of the peer called ``label`` (its name or ``peer{i}``), or None."""
    if label in names:
        return list(names).index(label)
    found = re.fullmatch(r"peer(\d+)", label)
    return int(found.group(1)) if found and int(found.group(1)) < len(names) else None
