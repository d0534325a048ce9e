"""Evaluation by domain: ``val/<domain>/ppl`` for data whose batches carry each token's domain.

When the data carries domains (``batch["domain"]``, :mod:`distilkit.data.domains`: a row field such as
``source``, or the data file), the evaluation of a module that scores one model also sums the student's (and,
where the chunks carry its logits, the teacher's) next-token NLL per domain of the predicted token, and logs
at the end of each evaluation ``{stage}/<domain>/ppl`` and ``{stage}/<domain>/teacher_ppl`` for every domain
with tokens in it. With several routed teachers, a domain's ``teacher_ppl`` is its own teacher's; with mixed
teachers, the mixture's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from distilkit.batch import Batch, next_token_targets
from distilkit.losses.chunked import ChunkObserver
from distilkit.losses.partial import PartialTargets


class DomainNLL(Metric):
    """NLL sums and token counts per domain, of the student and of the teacher, summed across processes.

    ``update(domains (n,), nll (n,), teacher_domains (m,), teacher_nll (m,))``; :meth:`compute` gives
    ``(ppl, teacher_ppl, tokens, teacher_tokens)``, each ``(D,)``.
    """

    is_differentiable = False
    full_state_update = False
    nll: Tensor
    tokens: Tensor
    teacher_nll: Tensor
    teacher_tokens: Tensor

    def __init__(self, domains: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, dtype in (("nll", torch.float64), ("tokens", torch.long)):
            for prefix in ("", "teacher_"):
                self.add_state(prefix + name, torch.zeros(domains, dtype=dtype), dist_reduce_fx="sum")

    def update(self, domains: Tensor, nll: Tensor, teacher_domains: Tensor, teacher_nll: Tensor) -> None:
        self.nll.index_add_(0, domains, nll.detach().double())
        self.tokens.index_add_(0, domains, torch.ones_like(domains))
        self.teacher_nll.index_add_(0, teacher_domains, teacher_nll.detach().double())
        self.teacher_tokens.index_add_(0, teacher_domains, torch.ones_like(teacher_domains))

    def compute(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ppl = torch.exp(self.nll / self.tokens.clamp(min=1))
        teacher_ppl = torch.exp(self.teacher_nll / self.teacher_tokens.clamp(min=1))
        return ppl, teacher_ppl, self.tokens, self.teacher_tokens


class DomainMetrics(nn.Module):
    """Per-domain perplexities of one evaluation stage.

    Args:
        names: the data's domain names by id (``TextDataModule.domain_names``); None names rows without the
            field, which count in the stage's overall metrics only.
    """

    def __init__(self, names: list[str | None]) -> None:
        super().__init__()
        self.names = list(names)
        self.nll = DomainNLL(len(names))

    def observer(self, batch: Batch, inner: ChunkObserver) -> ChunkObserver:
        """``inner``, and the per-domain sums from the same chunks: each position counts under the domain of
        the token it predicts."""
        keep, _ = next_token_targets(batch["labels"])  # (B, T-1)
        domains = batch["domain"][:, 1:][keep]  # (N,)

        def observe(rows: slice, student: Tensor, teacher: Any, labels: Tensor) -> None:
            inner(rows, student, teacher, labels)
            own = domains[rows].clamp_min(0)  # (n,)
            nll = F.cross_entropy(student.float(), labels, reduction="none")  # (n,)
            taught, targets = _taught(teacher)
            if isinstance(targets, Tensor):
                labels = labels if taught is None else labels[taught]
                teacher_nll = F.cross_entropy(targets.float(), labels, reduction="none")
                teacher_domains = own if taught is None else own[taught]
            else:
                teacher_nll, teacher_domains = nll[:0], own[:0]
            self.nll.update(own, nll, teacher_domains, teacher_nll)

        return observe

    def log(self, module: Any, stage: str) -> None:
        """``{stage}/<domain>/ppl`` (and ``teacher_ppl``) of every named domain with tokens; then reset."""
        # torchmetrics squeezes one-element results: one domain would come back 0-dim
        ppl, teacher_ppl, tokens, teacher_tokens = (t.reshape(-1) for t in self.nll.compute())
        for index, name in enumerate(self.names):
            if name is None or not int(tokens[index]):
                continue
            module.log(f"{stage}/{name}/ppl", ppl[index].float())
            if int(teacher_tokens[index]):
                module.log(f"{stage}/{name}/teacher_ppl", teacher_ppl[index].float())
        self.nll.reset()


def _taught(teacher: Any) -> tuple[Tensor | None, Any]:
    """``(rows, targets)``: the rows a teacher's chunk covers (None: all) and its targets there."""
    if isinstance(teacher, PartialTargets):
        return teacher.taught, teacher.targets
    return None, teacher
