"""Distillation metrics as ``torchmetrics.Metric`` s: their sums reduce across processes.

Each is updated chunk by chunk (the validation step walks the logits in chunks, like the training loss).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from distilkit.losses.base import kl_from_log_probs


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


class TopKAgreement(Metric):
    """Share of positions where the teacher's top-1 token is among the student's top ``k``.

    ``k = 1`` is plain top-1 agreement. ``update(student_logits (N, V), teacher_logits (N, V))``.
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

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        teacher_top = teacher_logits.argmax(-1, keepdim=True)  # (N, 1)
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
