"""Per-domain perplexities: each position counts under the domain of the token it predicts, one domain or
several, and domains without tokens are not logged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilkit.modules.domains import DomainMetrics


class Logged(dict):
    """Stands in for a LightningModule's ``log``: remembers what was logged."""

    def log(self, name: str, value: torch.Tensor) -> None:
        self[name] = float(value)


@pytest.mark.parametrize("names", [["only"], ["prose", "code", "unused"]])
def test_each_domain_logs_the_perplexity_of_its_own_tokens(names):
    torch.manual_seed(0)
    labels = torch.tensor([[5, 1, 2, 3], [4, 0, 6, 2]])  # (B, T): positions predict labels[:, 1:]
    domain = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]]) if len(names) > 1 else torch.zeros(2, 4).long()
    student, teacher = torch.randn(6, 8), torch.randn(6, 8)  # the 6 predicting positions, row-major
    metrics = DomainMetrics(names)
    observe = metrics.observer({"labels": labels, "domain": domain}, lambda *args: None)
    targets = labels[:, 1:].reshape(-1)
    observe(slice(0, 4), student[:4], teacher[:4], targets[:4])
    observe(slice(4, 6), student[4:], teacher[4:], targets[4:])
    logged = Logged()
    metrics.log(logged, "val")
    own = domain[:, 1:].reshape(-1)
    for index, name in enumerate(names):
        rows = own == index
        if not rows.any():
            assert f"val/{name}/ppl" not in logged, "a domain without tokens is not logged"
            continue
        for model, key in ((student, "ppl"), (teacher, "teacher_ppl")):
            expected = math.exp(float(F.cross_entropy(model[rows], targets[rows])))
            assert logged[f"val/{name}/{key}"] == pytest.approx(expected, rel=1e-5)
