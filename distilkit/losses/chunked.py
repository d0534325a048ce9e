"""Loss terms through the output heads in bounded memory.

The logits of a causal LM are ``(tokens, V)``: at 4,096 tokens and V = 65,536 that is 1 GiB in float32
per copy, and a plain KD step holds several copies (student and teacher logits, their log-softmaxes,
the gradient). Here the logits are formed chunk by chunk over tokens from the final hidden states.

:class:`ChunkedHeadLoss` is a custom autograd function in the spirit of fused linear cross-entropy
(Liger-Kernel): while it walks the chunks in the forward pass it also forms the gradient with respect
to the student's hidden states and head weight, so the backward pass only scales what was kept. No
chunk is recomputed, and memory beyond the inputs is one chunk of logits plus a gradient the size of
the head weight. The gradient of each chunk's terms with respect to its logits comes from autograd on that
chunk alone, so any :class:`~distilkit.losses.DistillationLoss` and any terms work unchanged; the default
terms (cross-entropy and forward KL, :mod:`distilkit.losses.closed_form`) are an autograd function whose
backward is a closed form, formed in buffers of a :class:`~distilkit.losses.workspace.Workspace` that the
loop lends while it works on a chunk and that lives from step to step.

Evaluation walks the same loop (no gradients formed) with an observer that updates its metrics from each
chunk's logits: one chunk loop for training and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.errors import ConfigError
from distilkit.losses.partial import PartialTargets
from distilkit.losses.workspace import Workspace
from distilkit.models.heads import OutputHead

#: What a chunk of student logits is compared with: the teacher's ``(n, V)`` logits (a live teacher, a
#: mixture of models ...) or its :class:`SparseTargets` (a teacher cache ...), either at some rows only
#: (:class:`PartialTargets`: several teachers that leave rows untaught), or None without a teacher.
TeacherChunk = Tensor | SparseTargets | PartialTargets | None

#: ``(student_logits (n, V), teacher chunk, labels (n,)) -> {name: mean over the chunk}``
TermsFn = Callable[[Tensor, TeacherChunk, Tensor], dict[str, Tensor]]


class TeacherChunks(Protocol):
    """The teacher's side of the loss at the N valid positions, a chunk of rows at a time (no gradient flows
    into it). ``out``: an ``(n, V)`` float32 buffer a dense source may write its logits into and return; a
    sparse source ignores it."""

    def __call__(self, rows: slice, out: Tensor | None = None) -> Tensor | SparseTargets | PartialTargets: ...


#: Bytes the chunked path may spend on one chunk's float32 ``(n, V)`` temporaries.
CHUNK_BUDGET_BYTES = 512 * 2**20
_LIVE_COPIES = 10  # (n, V) float32 tensors alive at once inside one chunk, forward and gradient


def auto_chunk_size(vocab_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk so that one chunk's temporaries fit ``budget_bytes`` (at least 16, at most 8,192)."""
    return int(min(8192, max(16, budget_bytes // (vocab_size * 4 * _LIVE_COPIES))))


def resolve_chunk_size(chunk_size: int | str | None, vocab_size: int) -> int | None:
    """``"auto"`` -> :func:`auto_chunk_size`; a positive integer or None (unchunked) as it is."""
    if chunk_size == "auto":
        return auto_chunk_size(vocab_size)
    positive = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0
    if chunk_size is None or positive:
        return chunk_size  # type: ignore[return-value]
    raise ConfigError("model.chunk_size", chunk_size, "must be a positive integer", 'use "auto" or null')


def chunk_slices(total: int, chunk_size: int | None) -> Iterator[slice]:
    """Consecutive slices of ``range(total)``, as few as hold at most ``chunk_size`` each, of near-equal
    sizes (no slice is much shorter than the others); one slice when None; one empty slice when ``total`` is
    0, so that every term exists."""
    count = 1 if chunk_size is None or total == 0 else -(-total // max(1, chunk_size))
    size, longer = divmod(total, count)  # the first `longer` slices hold one row more
    start = 0
    for index in range(count):
        stop = start + size + (index < longer)
        yield slice(start, stop)
        start = stop


#: Called on every chunk the loop walks: ``(rows, student_logits (n, V), teacher chunk, labels (n,))``;
#: evaluation updates its metrics this way, on the logits the loss already formed.
ChunkObserver = Callable[[slice, Tensor, TeacherChunk, Tensor], None]


@dataclass(frozen=True)
class HeadLossPlan:
    """Everything the chunked loss needs besides the student tensors that take gradients.

    Attributes:
        student_head: the student's output head (its ``weight``/``bias`` are passed separately).
        teacher: the teacher's side at the valid positions, chunk by chunk (:class:`TeacherChunks`), or None
            without a teacher.
        labels: ``(N,)`` next-token targets, all valid (masked positions removed beforehand).
        terms: the per-chunk terms; returns exactly the keys in ``names``.
        names: the names of the terms, in a fixed order.
        weights: total = Σ weights[name] · term[name]; terms not named get weight 0 (logged only).
        chunk_size: tokens per chunk (None: one chunk).
        observer: optional, called on every chunk (see :data:`ChunkObserver`).
        workspace: buffers kept between chunks and steps (a new one per call when None).
    """

    student_head: OutputHead
    teacher: TeacherChunks | None
    labels: Tensor
    terms: TermsFn
    names: tuple[str, ...]
    weights: Mapping[str, float]
    chunk_size: int | None
    observer: ChunkObserver | None = None
    workspace: Workspace | None = None

    def chunk_terms(
        self, student_raw: Tensor, rows: slice, teacher: TeacherChunk = None
    ) -> dict[str, Tensor]:
        """Terms of one chunk from the student's raw logits ``(n, V)``; each is the chunk mean × n/N.

        The one place a chunk is scored: both the training loss and evaluation come through here, and the
        :attr:`observer` sees the same logits. ``teacher``: the teacher's chunk if the caller has it already.
        """
        if teacher is None and self.teacher is not None:
            teacher = self.teacher(rows)
        labels = self.labels[rows]
        student_logits = self.student_head.post(student_raw)  # (n, V)
        if self.observer is not None:
            self.observer(rows, student_logits.detach(), teacher, labels)
        share = labels.numel() / max(self.labels.numel(), 1)
        terms = self.terms(student_logits, teacher, labels)
        return {name: value * share for name, value in terms.items()}

    def terms_and_gradient(
        self, features: Tensor, rows: slice, workspace: Workspace
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Terms of ``rows`` (as :meth:`chunk_terms`, detached) from the student's features ``(n, H)`` and the
        gradient of their weighted sum with respect to the raw logits ``(n, V)``, by autograd on this chunk
        alone (in the workspace's buffers, lent to the terms while they run)."""
        n, head, vocab = rows.stop - rows.start, self.student_head, self.student_head.vocab_size
        teacher = None
        if self.teacher is not None:  # a dense source writes its logits into the buffer
            teacher = self.teacher(rows, out=workspace("teacher", n, vocab, features.device))
        raw = head.raw(features, out=workspace("student", n, vocab, features.device))  # (n, V)
        with torch.enable_grad(), workspace.lent():
            raw = raw.detach().requires_grad_(True)
            terms = self.chunk_terms(raw, rows, teacher)
            (grad,) = torch.autograd.grad(self.weighted(terms), raw)  # (n, V)
        return {name: value.detach() for name, value in terms.items()}, grad

    def weighted(self, terms: Mapping[str, Tensor]) -> Tensor:
        return sum(self.weights.get(name, 0.0) * terms[name] for name in self.names)  # type: ignore[return-value]


class ChunkedHeadLoss(torch.autograd.Function):
    """``(features (N, H), weight (V_rows, H), bias (V_rows,) | None) -> (total, terms (K,))``.

    ``total`` is differentiable; ``terms`` (in the plan's term order) are for logging only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        features: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        plan: HeadLossPlan,
    ) -> tuple[Tensor, Tensor]:
        head = plan.student_head
        vocab = head.vocab_size
        want_feat, want_weight, want_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad_features = torch.zeros_like(features) if want_feat else None
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.float32) if want_weight and weight is not None else None
        )
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias and bias is not None else None
        sums = {name: features.new_zeros((), dtype=torch.float32) for name in plan.names}
        workspace = plan.workspace if plan.workspace is not None else Workspace()
        for rows in chunk_slices(features.shape[0], plan.chunk_size):
            chunk = features[rows]  # (n, H)
            terms, grad_raw = plan.terms_and_gradient(chunk, rows, workspace)  # grad_raw (n, V)
            for name in plan.names:
                sums[name] += terms[name].float()
            if head.weight is None:  # features are the logits themselves
                if grad_features is not None:
                    grad_features[rows, :vocab] = grad_raw.to(features.dtype)
                continue
            if grad_features is not None:
                grad_features[rows] = (grad_raw @ head.weight[:vocab]).to(features.dtype)  # (n, H)
            if grad_weight is not None and grad_raw.dtype == chunk.dtype == torch.float32:
                grad_weight[:vocab].addmm_(grad_raw.t(), chunk)  # (V, H), in place
            elif grad_weight is not None:
                grad_weight[:vocab] += (grad_raw.t() @ chunk).float()  # (V, H)
            if grad_bias is not None:
                grad_bias[:vocab] += grad_raw.float().sum(0)  # (V,)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)  # type: ignore[arg-type]  # None is allowed
        ctx.weight_dtype = None if weight is None else weight.dtype  # type: ignore[attr-defined]
        values = torch.stack([sums[name] for name in plan.names])  # (K,)
        total = plan.weighted(sums)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_values: Tensor):  # type: ignore[override]
        grad_features, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total

        def scaled(grad: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
            return None if grad is None else (grad * scale).to(dtype or grad.dtype)

        return (
            scaled(grad_features),
            scaled(grad_weight, ctx.weight_dtype),
            scaled(grad_bias, ctx.weight_dtype),
            None,
        )


def head_losses(features: Tensor, plan: HeadLossPlan) -> dict[str, Tensor]:
    """Named loss terms through the output heads, plus ``"loss"``, their weighted sum.

    Args:
        features: ``(N, H_s)`` student hidden states at the valid positions.
        plan: heads, teacher features, labels, terms, weights and chunk size.

    Returns:
        ``{"loss": total (differentiable), name: term (detached) ...}``. With ``plan.chunk_size`` None the
        full ``(N, V)`` logits are formed at once and autograd does the rest (the reference path); without
        gradients (evaluation) the chunks are scored one after another and nothing else is formed.
    """
    if plan.chunk_size is None or not torch.is_grad_enabled():  # the reference path, or evaluation
        sums: dict[str, Tensor] = {}
        for rows in chunk_slices(features.shape[0], plan.chunk_size):
            terms = plan.chunk_terms(plan.student_head.raw(features[rows]), rows)
            sums = {name: sums.get(name, 0) + value for name, value in terms.items()}  # type: ignore[misc]
        return {"loss": plan.weighted(sums), **{k: v.detach() for k, v in sums.items()}}
    head = plan.student_head
    total, values = ChunkedHeadLoss.apply(features, head.weight, head.bias, plan)
    return {"loss": total, **dict(zip(plan.names, values.unbind(0), strict=True))}
