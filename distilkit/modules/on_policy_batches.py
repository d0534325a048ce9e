"""The batches of on-policy distillation: the prompts sampling continues, and the samples as training data.

A prompt is the first ``prompt_tokens`` of a block of plain text (:func:`prompts_of`), or on chat data the
conversation before an assistant reply (:func:`reply_prompts`); a sampled batch goes back into the data's
layout with labels on the sampled tokens only (:func:`training_batch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distilkit.batch import IGNORE_INDEX, Batch, assistant_replies
from distilkit.models.generation import Sampled


def prompts_of(batch: Batch, prompt_tokens: int) -> tuple[Tensor, Tensor]:
    """The first ``prompt_tokens`` of each block as left-padded prompts: ``(B, P)`` ids and mask.

    A block's tail may be padding (the last, partial block of a split); its real tokens are moved to the
    right end of the prompt, in order, so that the prompt is left-padded as sampling requires.
    """
    ids = batch["input_ids"][:, :prompt_tokens]  # (B, P)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask[:, :prompt_tokens]
    order = mask.argsort(dim=1, stable=True)  # (B, P): padding first, then the real tokens in order
    return ids.gather(1, order), mask.gather(1, order)


def reply_prompts(batch: Batch, pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """The prompt of every assistant reply of a packed chat batch, left-padded: ``(R, P)`` ids and mask.

    Row ``r`` is reply ``r`` of :func:`~distilkit.batch.assistant_replies` (row-major order): the
    conversation before it, through the template's generation prompt (``<|im_start|>assistant\\n``),
    i.e. ``input_ids[row, prompt_start:reply_start]`` moved to the right end; ``P`` is the longest.
    A batch without replies gives ``(0, 1)``.
    """
    ids = batch["input_ids"]
    replies = assistant_replies(batch)  # (R, 4): row, prompt_start, reply_start, reply_end
    rows, starts, ends = replies[:, 0], replies[:, 1], replies[:, 2]
    width = max(int((ends - starts).max()), 1) if len(replies) else 1
    columns = ends[:, None] - width + torch.arange(width, device=ids.device)  # (R, P) source columns
    mask = columns >= starts[:, None]  # (R, P): false on the left padding
    prompts = ids[rows[:, None], columns.clamp(min=0)].masked_fill(~mask, pad_token_id)  # (R, P)
    return prompts, mask.long()


def training_batch(sampled: Sampled) -> dict[str, Tensor]:
    """A :class:`Sampled` batch in the data's layout: each row starts with its first real token (so the
    positions are those the sampler used) and ends in padding; labels score the sampled tokens only.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, P + N)``; labels are
        :data:`IGNORE_INDEX` on the prompt, after an EOS and on padding.
    """
    mask = sampled.attention_mask
    order = (mask == 0).long().argsort(dim=1, stable=True)  # (B, P + N): real tokens first, in order
    labels = sampled.labels(IGNORE_INDEX)
    return {
        "input_ids": sampled.tokens.gather(1, order),
        "attention_mask": mask.gather(1, order),
        "labels": labels.gather(1, order),
    }


def bigram_codes(batch: Batch, vocab_size: int) -> Tensor:
    """``(M,)`` one code ``a·V + b`` per pair of consecutive labelled tokens ``(a, b)`` of a
    :func:`training_batch` (the bigrams of the samples, none spanning the prompt)."""
    labels = batch["labels"]
    both = (labels[:, :-1] != IGNORE_INDEX) & (labels[:, 1:] != IGNORE_INDEX)  # (B, L-1)
    return (labels[:, :-1] * vocab_size + labels[:, 1:])[both]
