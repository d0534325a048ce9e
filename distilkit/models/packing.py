"""Rows that hold several sequences side by side (packed conversations), told apart by their positions.

A packed batch carries ``position_ids`` ``(B, T)`` that restart at 0 at every sequence (padding forms a
sequence of its own). transformers (5.x) reads the sequences from those positions when it is given no
2-D attention mask and no key-value cache: for ``sdpa``, ``eager`` and ``flex_attention`` it builds the
block-diagonal causal mask itself (``masking_utils.find_packed_sequence_indices``, sliding windows
included), and its flash-attention path runs the variable-length kernel from the positions, which it
does only for a batch of one row, so for those implementations the rows are laid end to end as one
``(1, B·T)`` row and the result is cut back to ``(B, T, ...)``. A 2-D ``attention_mask`` would turn all of
that off (attention across the whole row), so it is not passed: in a packed row no real token can see the
padding anyway, which is a sequence of its own after them.

Not every model reads its mask from the positions (in transformers 5.24 OPT and BLOOM, for instance, do
not), so before the first packed forward of a model :func:`packed_forward` checks it once: a row of two
sequences must give the second the same output whatever the first holds. A model that fails is refused
with a one-line error, never trained across conversations.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distilkit.errors import ConfigError

#: ``run(model, input_ids, attention_mask, output_hidden_states, **inputs) -> (last, hidden_states)``.
Run = Callable[..., tuple[Tensor, tuple[Tensor, ...] | None]]

_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def uses_varlen(model: nn.Module) -> bool:
    """Whether the model's attention is a flash-attention kernel (packed by positions in a single row)."""
    config: Any = getattr(model, "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def packed_forward(
    model: nn.Module,
    run: Run,
    input_ids: Tensor,
    position_ids: Tensor,
    output_hidden_states: bool = False,
    **inputs: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """``run`` the model on packed rows: ``(B, T)`` ids and positions, no 2-D attention mask, rows laid end
    to end for a flash-attention kernel. The model is checked once to keep the sequences apart.

    Returns:
        ``(B, T, H)`` final features (logits for a model without a separable head), and every layer's
        ``(B, T, H)`` when asked for.
    """
    _check_once(model, run)
    return _forward(model, run, input_ids, position_ids, output_hidden_states, **inputs)


def _forward(
    model: nn.Module,
    run: Run,
    input_ids: Tensor,
    position_ids: Tensor,
    output_hidden_states: bool,
    **inputs: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    rows, length = input_ids.shape
    if uses_varlen(model) and rows > 1:
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)  # (1, B*T)
    last, hidden = run(model, input_ids, None, output_hidden_states, position_ids=position_ids, **inputs)
    last = last.reshape(rows, length, -1)  # (B, T, H)
    if hidden is not None:
        hidden = tuple(h.reshape(rows, length, -1) for h in hidden)
    return last, hidden


def _check_once(model: nn.Module, run: Run) -> None:
    """Refuse a model whose output for one sequence of a packed row depends on the sequence before it."""
    if _CHECKED.get(model):
        return
    embeddings: Any = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = int(getattr(embeddings, "num_embeddings", 2))
    device = next(model.parameters()).device
    first = torch.arange(4, device=device) % vocab
    second = torch.arange(4, 7, device=device) % vocab
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)  # (1, 7): two sequences
    rows = torch.stack([torch.cat([first, second]), torch.cat([(first + 1) % vocab, second])])  # (2, 7)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [
                _forward(model, run, row[None], positions, False)[0][0, 4:].float() for row in rows
            ]  # (3, H)
    except TypeError as err:
        if "position_ids" not in str(err):
            raise
        raise ConfigError(
            "model",
            type(model).__name__,
            f"does not take position_ids ({err}), which packed conversations need",
            "use a transformers causal LM, or train it on plain text",
        ) from err
    finally:
        model.train(was_training)
    if not torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5 * max(float(outs[0].abs().max()), 1.0)):
        raise ConfigError(
            "model",
            type(model).__name__,
            "attends across the conversations packed into a block (it does not read its attention "
            "from position_ids)",
            "use a model family that does (GPT-2, Llama, Qwen2, Mistral, ...), or train on plain text",
        )
    _CHECKED[model] = True
