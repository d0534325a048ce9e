"""Divergences estimated from the teacher's draws: unbiased (value and gradient) for sampled targets and for
top-k targets with tail draws, bounded where stated, refused where the estimate would be unbounded."""

from __future__ import annotations

import math

import pytest
import torch

from distilkit.data.teacher_cache.codec import sample_targets, topk_targets
from distilkit.errors import ConfigError
from distilkit.losses import (
    DistillationLoss,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SparseTargets,
    SymmetricKLLoss,
    TVDLoss,
)
from distilkit.losses.draws import reverse_mixture_draws, softplus_ratio

N, V, DRAWS = 4, 12, 40_000
ESTIMATED = [
    ForwardKLLoss(),
    GeneralizedJSDLoss(beta=0.5),
    GeneralizedJSDLoss(beta=0.1),
    GeneralizedJSDLoss(beta=0.9),
    GeneralizedJSDLoss(beta=0.0),
    SkewForwardKLLoss(alpha=0.1),
    SkewReverseKLLoss(alpha=0.1),
    SkewReverseKLLoss(alpha=0.5),
    TVDLoss(),
]


def logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * torch.empty(N, 1).uniform_(1.0, 3.0, generator=g)


def draws(teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> SparseTargets:
    """Many draws per position: plain (weights 1/S) or the top 3 exact and the tail drawn."""
    uniforms = torch.rand(N, DRAWS, generator=torch.Generator().manual_seed(9))
    if kind == "sample":
        ids, log_probs = sample_targets(teacher, uniforms, temperature)
        return SparseTargets("sample", ids, log_probs, weights=torch.full(ids.shape, 1 / DRAWS))
    ids, log_probs, tail = topk_targets(teacher, 3, temperature, uniforms)
    weights = torch.cat([log_probs[:, :3].exp(), tail.exp().unsqueeze(-1).expand(N, DRAWS) / DRAWS], -1)
    return SparseTargets("topk", ids, log_probs, tail=tail, weights=weights, tail_draws=DRAWS)


def value_and_grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = student.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("kind", ["sample", "topk+draws"])
@pytest.mark.parametrize("loss", ESTIMATED, ids=lambda loss: f"{type(loss).__name__}{loss.knobs[1:]}")
def test_the_estimate_from_draws_is_unbiased(loss: DistillationLoss, kind: str) -> None:
    """With many draws, the estimate and its gradient approach the exact divergence's (within 1%: the
    bucketed divergence of 3 ids, the biased alternative, is 5-20% below here)."""
    teacher, student = logits(0), logits(1)
    targets = draws(teacher, kind)
    assert loss.uses_draws(targets)
    exact, exact_grad = value_and_grad(lambda x: loss(x, teacher), student)
    estimate, grad = value_and_grad(lambda x: loss.sparse_forward(x, targets), student)
    torch.testing.assert_close(estimate, exact, rtol=0.01, atol=1e-3)
    torch.testing.assert_close(grad, exact_grad, atol=0.03 * float(exact_grad.abs().max()), rtol=0)


def test_the_stratified_estimate_varies_less_than_plain_draws() -> None:
    """Top-k with tail draws: the head exact, so the estimate's spread over repeated caches is smaller than
    that of as many plain draws."""
    teacher, student = logits(2), logits(3)
    loss, estimates = ForwardKLLoss(), {"sample": [], "topk": []}
    for seed in range(40):
        g = torch.Generator().manual_seed(100 + seed)
        ids, log_probs = sample_targets(teacher, torch.rand(N, 8, generator=g), 1.0)
        plain = SparseTargets("sample", ids, log_probs, weights=torch.full(ids.shape, 1 / 8))
        ids, log_probs, tail = topk_targets(teacher, 4, 1.0, torch.rand(N, 4, generator=g))
        weights = torch.cat([log_probs[:, :4].exp(), tail.exp().unsqueeze(-1).expand(N, 4) / 4], -1)
        mixed = SparseTargets("topk", ids, log_probs, tail=tail, weights=weights, tail_draws=4)
        estimates["sample"].append(loss.sparse_divergence(student, plain))
        estimates["topk"].append(loss.sparse_divergence(student, mixed))
    spread = {kind: torch.stack(values).std(0).mean() for kind, values in estimates.items()}
    assert spread["topk"] < 0.5 * spread["sample"], spread


def test_draw_values_stay_finite_and_within_their_bounds() -> None:
    """Extreme ratios q/p (e^±80): the values and gradients are finite; KL(q‖m) lies in
    [−log w − c, −log w], TVD's in [0, 1]."""
    log_p = torch.tensor([[-80.0, -1.0, -0.1, -30.0, -87.0]])
    log_q = torch.tensor([[-0.1, -1.0, -80.0, -30.0, -0.01]]).requires_grad_(True)
    for w in (0.1, 0.5, 0.9):
        values = reverse_mixture_draws(log_p, log_q, w)
        c = (1 - w) / w
        assert bool(((values >= -math.log(w) - c - 1e-6) & (values <= -math.log(w) + 1e-6)).all())
        (grad,) = torch.autograd.grad(values.sum(), log_q)
        assert torch.isfinite(grad).all()
    u = torch.tensor([-200.0, -80.0, -1.0, 0.0, 1.0, 30.0, 200.0])
    h = softplus_ratio(u)
    expected = torch.tensor(
        [1.0, 1.0, math.log1p(math.e**-1) * math.e, math.log(2), math.log1p(math.e) / math.e]
    )
    torch.testing.assert_close(h[:5], expected)
    assert float(h[-1]) < 1e-80 or float(h[-1]) == 0.0
    for loss in ESTIMATED:
        values = loss.draw_divergence(log_p, log_q)
        (grad,) = torch.autograd.grad(values.sum(), log_q)
        assert torch.isfinite(values).all() and torch.isfinite(grad).all(), type(loss).__name__
    tvd = TVDLoss().draw_divergence(log_p, log_q)
    assert bool(((tvd >= 0) & (tvd <= 1)).all())


def test_losses_whose_estimate_would_be_unbounded_are_refused_and_fall_back_to_buckets() -> None:
    teacher, student = logits(4), logits(5)
    plain = draws(teacher, "sample")
    for loss in (
        ReverseKLLoss(),
        SymmetricKLLoss(),
        GeneralizedJSDLoss(beta=1.0),
        SkewReverseKLLoss(alpha=0.0),
    ):
        with pytest.raises(ConfigError, match=r"cannot be computed from sample targets .*q/p, unbounded"):
            loss.sparse_forward(student, plain)
        with pytest.raises(ConfigError, match="cannot be computed from sample targets"):
            loss.check_sparse("sample")
    gjsd = GeneralizedJSDLoss(beta=0.5)
    gjsd.check_sparse("sample")
    gjsd.set_knob("beta", 1.0)  # a curriculum stage: refused at the next step
    with pytest.raises(ConfigError, match="GeneralizedJSDLoss"):
        gjsd.sparse_forward(student, plain)
    # top-k targets with tail draws: such a loss takes the (K+1) buckets of the head and the tail instead
    mixed = draws(teacher, "topk+draws")
    ids, log_probs, tail = topk_targets(teacher, 3, 1.0)
    bare = SparseTargets("topk", ids, log_probs, tail=tail)
    for loss in (ReverseKLLoss(), GeneralizedJSDLoss(beta=1.0)):
        assert not loss.uses_draws(mixed)
        torch.testing.assert_close(loss.sparse_forward(student, mixed), loss.sparse_forward(student, bare))
    assert ForwardKLLoss().uses_draws(mixed) and not ForwardKLLoss().uses_draws(bare)
