"""From a model's last hidden state to its logits, in two separable halves.

Distillation losses are computed chunk by chunk over tokens so that the ``(tokens, V)`` logits are
never held whole. That needs each model split into a *body* (tokens -> final hidden states ``(B, T, H)``)
and an *output head* (hidden states -> logits), including whatever the model does after its linear
head: final-logit soft-capping (Gemma 2/3), a logit scale (Cohere), a logit divisor (Granite).

A module that is not a Hugging Face causal LM has no separable head: its body returns the logits
and its head is the identity, which is exact, only not memory-saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilkit.errors import ConfigError
from distilkit.models.packing import packed_forward


@dataclass(frozen=True)
class OutputHead:
    """The linear head of a model plus its post-processing.

    logits = post(features @ weight[:V]ᵀ + bias[:V]), post(z) = cap·tanh(scale·z / cap) or scale·z.

    Attributes:
        weight: ``(V_rows, H)`` head weight, or None when the features already are logits.
        bias: ``(V_rows,)`` or None.
        vocab_size: V, the number of rows used (padding rows beyond it are cut off).
        scale: multiplier applied to the raw logits (1.0 for most models).
        softcap: soft-capping constant, or None.
    """

    weight: Tensor | None
    bias: Tensor | None
    vocab_size: int
    scale: float = 1.0
    softcap: float | None = None

    def raw(self, features: Tensor, out: Tensor | None = None) -> Tensor:
        """``(N, H)`` features -> ``(N, V)`` logits before post-processing; written into ``out`` ``(N, V)``
        when it is given and features, weight and ``out`` share their dtype (outside autocast)."""
        if self.weight is None:
            return features[..., : self.vocab_size]
        weight, bias = (
            self.weight[: self.vocab_size],
            None if self.bias is None else self.bias[: self.vocab_size],
        )
        same = (
            out is not None
            and features.dtype == weight.dtype == out.dtype
            and features.dim() == 2
            and out.shape == (features.shape[0], weight.shape[0])
        )  # else a new tensor: ``out`` is only a place to write into when it fits
        if out is None or not same or torch.is_autocast_enabled(features.device.type):
            return F.linear(features, weight, bias)
        torch.mm(features, weight.t(), out=out)  # (N, V)
        return out if bias is None else out.add_(bias)

    def post(self, raw_logits: Tensor) -> Tensor:
        """Apply the model's post-head processing to raw logits (any shape)."""
        logits = raw_logits * self.scale if self.scale != 1.0 else raw_logits
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __call__(self, features: Tensor) -> Tensor:
        return self.post(self.raw(features))


def output_head(model: nn.Module, vocab_size: int) -> OutputHead:
    """The :class:`OutputHead` of ``model``, read fresh (parameters may move or be wrapped between steps)."""
    if not _has_separable_head(model):
        return OutputHead(weight=None, bias=None, vocab_size=vocab_size)
    hf_model: Any = model
    linear, config = hf_model.get_output_embeddings(), hf_model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: logits * logit_scale
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor:
        scale /= float(divisor)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return OutputHead(linear.weight, linear.bias, vocab_size, scale, float(softcap) if softcap else None)


class BodyOutput(NamedTuple):
    """What a model's body returns.

    Attributes:
        last: ``(B, T, H)`` final hidden states (after the final norm); the ``(B, T, V)`` logits for a model
            without a separable head.
        hidden_states: per layer ``(B, T, H)``, index 0 the embedding output, when asked for; else None.
    """

    last: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


def body_features(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    output_hidden_states: bool = False,
    **inputs: Tensor,
) -> BodyOutput:
    """Run the model's body on ``(B, T)`` ids: its final hidden states, and every layer's if asked.
    ``inputs``: further forward arguments of the batch (``position_ids``; see
    :func:`distilkit.batch.model_inputs`).

    With ``position_ids`` the rows are packed (several sequences each, positions restarting at 0 at every
    one, see :mod:`distilkit.models.packing`): attention never crosses a sequence, the 2-D
    ``attention_mask`` is not passed (it would make attention span the whole row), and a model that does
    not keep the sequences apart is refused."""
    position_ids = inputs.pop("position_ids", None)
    if position_ids is not None:
        return BodyOutput(
            *packed_forward(model, _body, input_ids, position_ids, output_hidden_states, **inputs)
        )
    return BodyOutput(*_body(model, input_ids, attention_mask, output_hidden_states, **inputs))


def _body(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    output_hidden_states: bool,
    **inputs: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    if _has_separable_head(model):
        base: Any = model.base_model
        out = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            **inputs,
        )
        return out[0], out.hidden_states if output_hidden_states else None
    if output_hidden_states:
        raise ConfigError(
            "model",
            type(model).__name__,
            "has no hidden states to distil",
            "use a Hugging Face causal LM, or drop hidden_loss",
        )
    out = model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
    return (out.logits if hasattr(out, "logits") else out), None


def check_head(model: nn.Module, head: OutputHead, field: str) -> None:
    """Refuse a model whose logits are not ``head(body_features(...))``.

    Runs both paths on a few tokens. A family that changes its logits in a way this file does not know
    is refused with a clear error instead of being distilled against the wrong distribution.
    """
    if head.weight is None:
        return
    device = head.weight.device
    ids = torch.arange(4, device=device).unsqueeze(0) % head.vocab_size  # (1, 4)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., : head.vocab_size]
        got = head(body_features(model, ids, mask).last)
    model.train(was_training)
    if not torch.allclose(expected.float(), got.float(), rtol=1e-3, atol=1e-3):
        raise ConfigError(
            field,
            type(model).__name__,
            "post-processes its logits in a way the chunked loss does not reproduce",
            "set model.chunk_size: null to use the unchunked path for this model",
        )


def _has_separable_head(model: nn.Module) -> bool:
    get_head: Any = getattr(model, "get_output_embeddings", None)
    body = getattr(model, "base_model", model)
    return callable(get_head) and isinstance(get_head(), nn.Linear) and body is not model
