"""Distillation metrics as ``torchmetrics.Metric`` s: their sums reduce across processes.

Each is updated chunk by chunk (the validation step walks the logits in chunks, like the training loss).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.losses.base import kl_from_log_probs
from distilkit.losses.partial import PartialTargets


class TokenPerplexity(Metric):
    """exp(Σ token NLL / token count), from per-token NLL the caller already has (no second softmax).

    ``update(token_nll)`` takes ``(N,)`` negative log-likelihoods of the target tokens.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    nll_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_nll: Tensor) -> None:
        self.nll_sum += token_nll.detach().double().sum()
        self.count += token_nll.numel()

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.count.clamp(min=1)).float()


class BitsPerByte(Metric):
    """Bits per byte of text: Σ token NLL / (ln 2 · Σ bytes of the predicted tokens), comparable across
    tokenizers (the same text costs the same bytes whatever splits it). Special tokens (EOS) stand for no
    bytes but their NLL counts, as in lm-evaluation-harness's ``bits_per_byte``.

    ``update(token_nll (N,), token_bytes (N,))``: the NLL of each predicted token and its UTF-8 length.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    nll_sum: Tensor
    byte_count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("byte_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_nll: Tensor, token_bytes: Tensor) -> None:
        self.nll_sum += token_nll.detach().double().sum()
        self.byte_count += token_bytes.sum()

    def compute(self) -> Tensor:
        return (self.nll_sum / (math.log(2) * self.byte_count.clamp(min=1))).float()


class TopKAgreement(Metric):
    """Share of positions where the teacher's top-1 token is among the student's top ``k``.

    ``k = 1`` is plain top-1 agreement. ``update(student_logits (N, V), teacher (N, V))``: the teacher's
    logits, or ``(N,)`` its top-1 token ids (what a top-k teacher cache keeps first).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    hits: Tensor
    count: Tensor

    def __init__(self, k: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        self.k = k
        self.add_state("hits", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher: Tensor) -> None:
        teacher_top = (
            teacher.reshape(-1, 1) if teacher.dim() == 1 else teacher.argmax(-1, keepdim=True)
        )  # (N, 1)
        student_top = student_logits.topk(self.k, dim=-1).indices  # (N, k)
        self.hits += (student_top == teacher_top).any(-1).sum()
        self.count += teacher_top.shape[0]

    def compute(self) -> Tensor:
        return self.hits.float() / self.count.clamp(min=1)


class DistillationKL(Metric):
    """Mean per-token KL(p‖q) from the teacher distribution p to the student's q, at temperature 1.

    ``update(student_logits (N, V), teacher_logits (N, V))``; the sum of per-token KL and the token count
    reduce across processes.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    kl_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("kl_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        log_q = student_logits.detach().float().log_softmax(-1)  # (N, V)
        log_p = teacher_logits.detach().float().log_softmax(-1)  # (N, V)
        self.kl_sum += kl_from_log_probs(log_p, log_q).double().sum()
        self.count += log_q.shape[0]

    def compute(self) -> Tensor:
        return (self.kl_sum / self.count.clamp(min=1)).float()


class EvaluationMetrics(nn.Module):
    """The validation metrics of a distillation run, updated from each chunk of logits the loss forms.

    ``ppl`` (the student's), ``bpb`` (its bits per byte, once :meth:`set_token_bytes` gave the tokenizer's
    byte lengths), and with a teacher ``teacher_ppl``, ``teacher_bpb``, ``top1_agreement`` and ``kl``
    (KL(teacher‖student) at temperature 1). :meth:`observe` is a chunk observer of the loss's chunk loop.
    From a teacher cache only what its targets determine is computed: ``top1_agreement`` from top-k targets
    (their first id is the teacher's top-1); the teacher's perplexity and the full KL are not.
    """

    token_bytes: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.ppl, self.teacher_ppl = TokenPerplexity(), TokenPerplexity()
        self.bpb, self.teacher_bpb = BitsPerByte(), BitsPerByte()
        self.top1_agreement, self.kl = TopKAgreement(k=1), DistillationKL()
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_token_bytes(self, lengths: Tensor) -> None:
        """``(V,)`` the UTF-8 length of every token id of the data's tokenizer (what ``bpb`` divides by)."""
        self.token_bytes = lengths.to(self.token_bytes.device, torch.long)

    def observe(self, rows: slice, student: Tensor, teacher: Any, labels: Tensor) -> None:
        """Update from one chunk: logits ``(n, V)`` of the student and (when it is a tensor) of the teacher,
        targets ``(n,)``. Rows a teacher leaves untaught (:class:`PartialTargets`) count for the student's
        metrics only."""
        nll = F.cross_entropy(student.float(), labels, reduction="none")  # (n,)
        self.ppl.update(nll)
        counted = self.token_bytes.numel() > 0
        sizes = self.token_bytes[labels] if counted else None  # (n,)
        if sizes is not None:
            self.bpb.update(nll, sizes)
        if isinstance(teacher, PartialTargets):
            taught = teacher.taught
            student, labels, sizes = student[taught], labels[taught], None if sizes is None else sizes[taught]
            teacher = teacher.targets
        if isinstance(teacher, Tensor):
            teacher_nll = F.cross_entropy(teacher.float(), labels, reduction="none")
            self.teacher_ppl.update(teacher_nll)
            if sizes is not None:
                self.teacher_bpb.update(teacher_nll, sizes)
            self.top1_agreement.update(student, teacher)
            self.kl.update(student, teacher)
        elif isinstance(teacher, SparseTargets) and teacher.mode == "topk":
            self.top1_agreement.update(student, teacher.ids[:, 0])  # (n,) ids sorted by probability

    def logged(self, with_teacher: bool) -> dict[str, Metric]:
        """The metrics to log, by name: ``ppl`` and ``bpb``, and with a teacher those of its metrics that the
        chunks updated (all with a live teacher; ``top1_agreement`` with a top-k cache; none with a sampled
        one)."""
        names = ("ppl", "bpb", "teacher_ppl", "teacher_bpb", "top1_agreement", "kl")
        own = ("ppl", "bpb")
        return {
            name: getattr(self, name)
            for name in names
            if (name in own or with_teacher) and (name == "ppl" or getattr(self, name).update_called)
        }


class NextTokenNLL:
    """Per-position NLL of the next token, filled chunk by chunk as an observer of the loss's chunk loop.

    Args:
        keep: ``(B, T-1)`` the positions that predict a token (:func:`distilkit.batch.next_token_targets`).
        with_teacher: also keep the teacher's NLL (the chunks then carry its logits).
        name: what :meth:`result` calls the scored model's NLL (``student``, ``peer0`` ...).
    """

    def __init__(self, keep: Tensor, with_teacher: bool, name: str = "student") -> None:
        self.keep, self.name = keep, name
        count = int(keep.sum())
        names = (name, "teacher") if with_teacher else (name,)
        self.flat = {n: torch.full((count,), float("nan"), device=keep.device) for n in names}  # (N,)

    def observe(self, rows: slice, student: Tensor, teacher: Any, labels: Tensor) -> None:
        self.flat[self.name][rows] = F.cross_entropy(student.float(), labels, reduction="none")
        if "teacher" not in self.flat:
            return
        if isinstance(teacher, Tensor):
            self.flat["teacher"][rows] = F.cross_entropy(teacher.float(), labels, reduction="none")
        elif isinstance(teacher, PartialTargets) and isinstance(
            teacher.targets, Tensor
        ):  # NaN where untaught
            nll = F.cross_entropy(teacher.targets.float(), labels[teacher.taught], reduction="none")
            self.flat["teacher"][rows][teacher.taught] = nll

    def result(self) -> dict[str, Tensor]:
        """``{model: (B, T-1)}`` NLLs, NaN where no token is predicted."""
        out = {}
        for name, values in self.flat.items():
            full = torch.full(self.keep.shape, float("nan"), device=values.device)  # (B, T-1)
            full[self.keep] = values
            out[name] = full
        return out
