"""Losses from sparse teacher targets (top-k + tail, sampled) against the full-logit losses."""

from __future__ import annotations

import math

import pytest
import torch

from distilkit.batch import next_token_targets
from distilkit.data.teacher_cache.codec import sample_targets, topk_targets
from distilkit.errors import ConfigError
from distilkit.losses import (
    DistillationLoss,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SparseTargets,
    SymmetricKLLoss,
    TVDLoss,
)
from distilkit.losses.sparse import bucket_log_probs

DIVERGENCES = [
    ForwardKLLoss,
    ReverseKLLoss,
    SymmetricKLLoss,
    GeneralizedJSDLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
]


def logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    """``(n, V)`` logits with a spread of sharpness (scale 0.5 … 6 per row)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.empty(n, 1).uniform_(0.5, 6.0, generator=g)
    return torch.randn(n, vocab, generator=g) * scale


def topk(teacher: torch.Tensor, k: int, temperature: float) -> SparseTargets:
    ids, log_probs, tail = topk_targets(teacher, k, temperature)
    return SparseTargets("topk", ids, log_probs, tail=tail, temperature=temperature)


def value_and_grad(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.clone().requires_grad_(True)
    value = loss_fn(student)
    (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_topk_with_k_equal_to_v_is_the_full_forward_kl(temperature: float) -> None:
    teacher, student = logits(32, 64, seed=0), logits(32, 64, seed=1)
    loss = ForwardKLLoss(temperature=temperature)
    targets = topk(teacher, 64, temperature)
    assert torch.isinf(targets.tail).all() and (targets.tail < 0).all()  # nothing left outside: tail = −inf
    full, full_grad = value_and_grad(lambda s: loss(s, teacher), student)
    sparse, sparse_grad = value_and_grad(lambda s: loss.sparse_forward(s, targets), student)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, full_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_class", DIVERGENCES)
def test_every_divergence_on_all_ids_equals_its_full_value(loss_class: type[DistillationLoss]) -> None:
    """K = V buckets are the full distributions (in another order): every divergence is unchanged."""
    teacher, student = logits(16, 48, seed=2), logits(16, 48, seed=3)
    loss = loss_class(temperature=2.0)
    full, full_grad = value_and_grad(lambda s: loss(s, teacher), student)
    sparse, sparse_grad = value_and_grad(lambda s: loss.sparse_forward(s, topk(teacher, 48, 2.0)), student)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, full_grad, rtol=1e-4, atol=1e-6)


def bucketed_kl_float64(teacher: torch.Tensor, student: torch.Tensor, k: int, temperature: float) -> float:
    """T² · mean KL of the (K+1)-bucket distributions, computed independently in float64."""
    p = (teacher.double() / temperature).softmax(-1)  # (N, V)
    q = (student.double() / temperature).softmax(-1)
    ids = p.argsort(-1, descending=True)[:, :k]  # (N, K)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)  # (N, V)
    p_b = torch.cat([p.gather(-1, ids), (p * outside).sum(-1, keepdim=True)], -1)  # (N, K+1)
    q_b = torch.cat([q.gather(-1, ids), (q * outside).sum(-1, keepdim=True)], -1)
    return float((p_b * (p_b.log() - q_b.log())).sum(-1).mean() * temperature**2)


@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (5, 1.0), (16, 2.0), (100, 0.5)])
def test_topk_below_v_is_the_bucketed_kl_and_at_most_the_full_kl(k: int, temperature: float) -> None:
    teacher, student = logits(24, 128, seed=4), logits(24, 128, seed=5)
    loss = ForwardKLLoss(temperature=temperature)
    sparse = float(loss.sparse_forward(student, topk(teacher, k, temperature)))
    assert sparse == pytest.approx(bucketed_kl_float64(teacher, student, k, temperature), rel=1e-4, abs=1e-6)
    assert sparse <= float(loss(student, teacher)) + 1e-6
    reverse = ReverseKLLoss(temperature=temperature)  # coarse-graining lowers every f-divergence
    assert float(reverse.sparse_forward(student, topk(teacher, k, temperature))) <= float(
        reverse(student, teacher)
    )


def test_topk_gradient_flows_to_the_tail_logits() -> None:
    """Ids outside the top K get the gradient of the tail bucket: q_v · (1 − p_tail / q_tail)."""
    teacher, student = logits(8, 32, seed=6), logits(8, 32, seed=7)
    targets = topk(teacher, 4, 1.0)
    _, grad = value_and_grad(lambda s: ForwardKLLoss().sparse_forward(s, targets), student)
    q = student.softmax(-1)
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, targets.ids, False)  # (N, V)
    q_tail = (q * outside).sum(-1, keepdim=True)
    expected = q * (1 - targets.tail.exp().unsqueeze(-1) / q_tail) / 8  # mean over 8 positions
    torch.testing.assert_close(grad[outside], expected[outside], rtol=1e-4, atol=1e-7)


def sampled(teacher: torch.Tensor, samples: int, temperature: float, seed: int) -> SparseTargets:
    g = torch.Generator().manual_seed(seed)
    ids, log_probs = sample_targets(teacher, torch.rand(teacher.shape[0], samples, generator=g), temperature)
    weights = torch.full(ids.shape, 1.0 / samples)
    return SparseTargets("sample", ids, log_probs, weights=weights, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimate_converges_to_the_full_forward_kl(temperature: float) -> None:
    """The mean of R sampled estimates (S draws per position) is within 4 standard errors of the KL.

    One draw's estimate log p(x) − log q(x) has variance σ² = Var_{x∼p}[log p(x) − log q(x)] per position,
    so the mean over N positions, S draws and R seeds has standard error T²·sqrt(Σ σ² / (S·R)) / N (exact
    σ² from p and q). The gradient q − p̂ of one seed has per-entry variance (T/N)²·p_v(1 − p_v)/S, so
    E‖mean gradient − true gradient‖² = (T/N)²·Σ p_v(1 − p_v)/(S·R); the test allows 3× that (a sum of
    hundreds of such terms almost never exceeds twice its mean).
    """
    n, vocab, samples, seeds = 16, 64, 12, 400
    teacher, student = logits(n, vocab, seed=8), logits(n, vocab, seed=9)
    loss = ForwardKLLoss(temperature=temperature)
    full, full_grad = value_and_grad(lambda s: loss(s, teacher), student)
    # R seed sets at once: the mean over R·N rows is the mean of the R per-set losses (and gradients)
    stacked = sampled(teacher.repeat(seeds, 1), samples, temperature, seed=0)  # (R·N, S)
    mean, mean_grad = value_and_grad(lambda s: loss.sparse_forward(s.repeat(seeds, 1), stacked), student)
    log_p = (teacher.double() / temperature).log_softmax(-1)
    log_q = (student.double() / temperature).log_softmax(-1)
    p = log_p.exp()
    variance = (p * (log_p - log_q) ** 2).sum(-1) - (p * (log_p - log_q)).sum(-1) ** 2  # (N,)
    standard_error = temperature**2 * math.sqrt(float(variance.sum()) / (samples * seeds)) / n
    assert abs(float(mean) - float(full)) <= 4 * standard_error, (float(mean), float(full), standard_error)
    expected_sq = (temperature / n) ** 2 * float((p * (1 - p)).sum()) / (samples * seeds)
    assert float(((mean_grad - full_grad).double() ** 2).sum()) <= 3 * expected_sq


def test_sampled_draws_are_unbiased_frequencies() -> None:
    """Over many uniforms, inverse-CDF draws hit each id with the teacher's probability."""
    teacher = logits(1, 16, seed=10).repeat(20_000, 1)
    ids, log_probs = sample_targets(
        teacher, torch.rand(20_000, 1, generator=torch.Generator().manual_seed(0)), 1.0
    )
    p = teacher[0].softmax(-1)
    frequency = torch.bincount(ids.reshape(-1), minlength=16).double() / ids.numel()
    standard_error = (p * (1 - p) / ids.numel()).sqrt().double()
    assert ((frequency - p.double()).abs() <= 4.5 * standard_error + 1e-9).all()
    torch.testing.assert_close(log_probs.reshape(-1), teacher[0].log_softmax(-1)[ids.reshape(-1)])


def test_sampled_loss_of_the_teacher_itself_is_zero() -> None:
    teacher = logits(32, 64, seed=11)
    for temperature in (1.0, 3.0):
        targets = sampled(teacher, 12, temperature, seed=0)
        value = ForwardKLLoss(temperature=temperature).sparse_forward(teacher, targets)
        assert abs(float(value)) < 1e-5


def test_losses_that_cannot_use_the_targets_are_refused() -> None:
    teacher, student = logits(4, 32, seed=12), logits(4, 32, seed=13)
    with pytest.raises(ConfigError, match="needs the teacher's full logits"):
        LogitMSELoss().sparse_forward(student, topk(teacher, 8, 1.0))
    with pytest.raises(ConfigError, match="needs the teacher's full logits"):
        LogitMSELoss().check_sparse("topk")
    for loss in (ReverseKLLoss(), SymmetricKLLoss(), GeneralizedJSDLoss(beta=1.0)):
        with pytest.raises(
            ConfigError, match="use ForwardKLLoss, GeneralizedJSDLoss .* with a sampled cache"
        ):
            loss.sparse_forward(student, sampled(teacher, 4, 1.0, seed=0))
    with pytest.raises(ConfigError, match=r"loss.temperature=2.0: differs .* \(1.0\)"):
        ForwardKLLoss(temperature=2.0).sparse_forward(student, topk(teacher, 8, 1.0))
    ForwardKLLoss().check_sparse("sample", 1.0)  # accepted


def test_select_shifts_and_masks_like_the_module() -> None:
    """``select`` keeps the same positions, in the same order, as the module (``next_token_targets``)."""
    b, t, k = 3, 10, 4
    position = torch.arange(b * t).view(b, t)  # (B, T)
    targets = SparseTargets(
        "topk",
        position.unsqueeze(-1).repeat(1, 1, k),
        torch.zeros(b, t, k),
        tail=position.float(),
        temperature=1.0,
    )
    labels = torch.randint(0, 50, (b, t))
    labels[0, 7:] = -100  # padding at the end of a block
    labels[1, 3] = -100
    features = position.unsqueeze(-1).float()  # (B, T, 1)
    keep, _ = next_token_targets(labels)
    kept = features[:, :-1][keep]  # (N, 1): what DistillationModule.compute_loss keeps
    selected = targets.select(labels)
    assert selected.ids.shape == (kept.shape[0], k)
    assert torch.equal(selected.ids[:, 0], kept[:, 0].long())
    assert torch.equal(selected.tail, kept[:, 0])


def test_labels_mask_chunks_and_empty_input() -> None:
    teacher, student = logits(20, 32, seed=14), logits(20, 32, seed=15)
    targets, loss = topk(teacher, 6, 1.0), SymmetricKLLoss()
    labels = torch.arange(20)
    labels[::3] = -100
    keep = labels != -100
    masked = loss.sparse_forward(student, targets, labels)
    torch.testing.assert_close(masked, loss.sparse_forward(student[keep], targets[keep]))
    # chunk by chunk, each chunk's mean weighted by its share of the rows, as the chunked path does
    chunks = sum(
        loss.sparse_forward(student[r], targets[r]) * (r.stop - r.start) / 20
        for r in (slice(0, 7), slice(7, 20))
    )
    torch.testing.assert_close(chunks, loss.sparse_forward(student, targets))
    none = torch.full((20,), -100)
    s = student.clone().requires_grad_(True)
    zero = loss.sparse_forward(s, targets, none)
    zero.backward()
    assert zero.item() == 0.0 and s.grad is not None
    # (B, T, V) logits with (B, T, K) targets flatten alike
    torch.testing.assert_close(
        loss.sparse_forward(student.view(4, 5, 32), targets.apply(lambda x: x.reshape(4, 5, *x.shape[1:]))),
        loss.sparse_forward(student, targets),
    )


def test_sparse_targets_refuse_inconsistent_fields() -> None:
    ids, lp = torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="tail"):
        SparseTargets("topk", ids, lp)
    with pytest.raises(ValueError, match="weights"):
        SparseTargets("sample", ids, lp, weights=torch.ones(3, 5))
    with pytest.raises(ValueError, match="mode"):
        SparseTargets("full", ids, lp)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("tail", [True, False])
def test_fused_bucket_log_probs_match_autograd(tail: bool, with_extra: bool) -> None:
    """The hand-written gradient of bucket_log_probs passes gradcheck and equals autograd's plain formula."""
    z = logits(6, 20, seed=16).double().requires_grad_(True)
    ids = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(i))[:5] for i in range(6)])
    if not tail:
        ids[:, 3] = ids[:, 0]  # sampled ids may repeat
    extra = torch.stack([ids[:, 1], torch.arange(6) + 10], -1) if with_extra else None  # (6, 2), in and out
    assert torch.autograd.gradcheck(lambda x: bucket_log_probs(x, ids, tail, extra), (z,))
    total = z.logsumexp(-1, keepdim=True)
    columns = [z.gather(-1, ids) - total]
    if tail:
        columns.append(z.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - total)
    if extra is not None:
        columns.append(z.gather(-1, extra) - total)
    plain = torch.cat(columns, -1)
    upstream = torch.randn(plain.shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(plain, z, upstream)
    fused = bucket_log_probs(z, ids, tail, extra)
    (got,) = torch.autograd.grad(fused, z, upstream)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(got, expected)
    assert not bucket_log_probs(z.detach(), ids, tail, extra).requires_grad


@pytest.mark.parametrize("mode", ["topk", "sample"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_and_ce_together_equal_the_two_apart(mode: str, temperature: float) -> None:
    """sparse_forward_and_ce (one softmax at T = 1) gives sparse_forward and the cross-entropy, and their
    gradients, with masked labels."""
    teacher, student = logits(24, 64, seed=17), logits(24, 64, seed=18)
    targets = topk(teacher, 8, temperature) if mode == "topk" else sampled(teacher, 12, temperature, seed=1)
    labels = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(0))
    labels[::5] = -100
    keep = labels != -100
    loss = (
        SymmetricKLLoss(temperature=temperature) if mode == "topk" else ForwardKLLoss(temperature=temperature)
    )
    upstream = (0.3, 0.7)

    def apart(s: torch.Tensor) -> torch.Tensor:
        kd = loss.sparse_forward(s, targets, labels)
        ce = torch.nn.functional.cross_entropy(s[keep], labels[keep])
        return upstream[0] * kd + upstream[1] * ce

    def together(s: torch.Tensor) -> torch.Tensor:
        kd, ce = loss.sparse_forward_and_ce(s, targets, labels)
        return upstream[0] * kd + upstream[1] * ce

    value, grad = value_and_grad(together, student)
    expected, expected_grad = value_and_grad(apart, student)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
