"""The loss family against independent float64 references, and its properties."""

from __future__ import annotations

import pytest
import torch

from distilkit.errors import ConfigError
from distilkit.losses import (
    DistillationLoss,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TVDLoss,
)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) for probability rows, float64, written from the definition."""
    return (a * (a.log() - b.log())).sum(-1)


def reference(name: str, s: torch.Tensor, t: torch.Tensor, param: float) -> torch.Tensor:
    """Per-position divergence of temperature-scaled float64 logits, straight from DESIGN.md's formulas."""
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    if name == "forward":
        return _kl(p, q)
    if name == "reverse":
        return _kl(q, p)
    if name == "symmetric":
        return param * _kl(p, q) + (1 - param) * _kl(q, p)
    if name == "jsd":
        if param == 0:
            return _kl(p, q)
        if param == 1:
            return _kl(q, p)
        m = param * p + (1 - param) * q
        return param * _kl(p, m) + (1 - param) * _kl(q, m)
    if name == "skew_forward":
        return _kl(p, param * p + (1 - param) * q)
    if name == "skew_reverse":
        return _kl(q, param * q + (1 - param) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "mse":
        return ((s - t) ** 2).mean(-1)
    raise ValueError(name)


CASES = [
    ("forward", lambda T, a: ForwardKLLoss(temperature=T), None),
    ("reverse", lambda T, a: ReverseKLLoss(temperature=T), None),
    ("symmetric", lambda T, a: SymmetricKLLoss(weight=a, temperature=T), 0.3),
    ("jsd", lambda T, a: GeneralizedJSDLoss(beta=a, temperature=T), 0.4),
    ("jsd", lambda T, a: GeneralizedJSDLoss(beta=a, temperature=T), 0.0),
    ("jsd", lambda T, a: GeneralizedJSDLoss(beta=a, temperature=T), 1.0),
    ("skew_forward", lambda T, a: SkewForwardKLLoss(alpha=a, temperature=T), 0.1),
    ("skew_reverse", lambda T, a: SkewReverseKLLoss(alpha=a, temperature=T), 0.1),
    ("tvd", lambda T, a: TVDLoss(temperature=T), None),
    ("mse", lambda T, a: LogitMSELoss(temperature=T), None),
]


def _inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 5, 11, generator=g) * 2).to(dtype)
    t = (torch.randn(2, 5, 11, generator=g) * 2).to(dtype)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = labels[1, 3] = labels[1, 4] = -100
    return s, t, labels


@pytest.mark.parametrize("name,make,param", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference_value_and_gradient(name, make, param, temperature, masked, dtype):
    s, t, labels = _inputs(dtype)
    loss_fn = make(temperature, param)
    s_ours = s.clone().requires_grad_(True)
    ours = loss_fn(s_ours, t, labels if masked else None)
    ours.backward()

    s_ref = s.double().clone().requires_grad_(True)
    keep = (labels != -100) if masked else torch.ones_like(labels, dtype=torch.bool)
    per = reference(name, s_ref / temperature, t.double() / temperature, param)  # (2, 5)
    expected = per[keep].mean() * temperature**2
    expected.backward()

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-4, atol=1e-5)
    grad_tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(s_ours.grad.double(), s_ref.grad.to(s_ours.grad.dtype).double(), **grad_tol)


@pytest.mark.parametrize("name,make,param", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_nonnegative_and_zero_at_identity(name, make, param):
    s, t, _ = _inputs(torch.float32, seed=1)
    loss_fn = make(1.5, param)
    assert loss_fn(s, t) >= 0
    assert loss_fn(t, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name,make,param", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_all_masked_is_zero_with_a_gradient_path(name, make, param):
    s, t, labels = _inputs(torch.float32)
    s.requires_grad_(True)
    out = make(2.0, param)(s, t, torch.full_like(labels, -100))
    assert out.item() == 0.0
    out.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) == 0


def test_jsd_endpoints_equal_forward_and_reverse_kl():
    s, t, labels = _inputs(torch.float32)
    assert GeneralizedJSDLoss(beta=0.0)(s, t, labels) == ForwardKLLoss()(s, t, labels)
    assert GeneralizedJSDLoss(beta=1.0)(s, t, labels) == ReverseKLLoss()(s, t, labels)


def test_skew_at_alpha_zero_is_the_plain_kl():
    s, t, labels = _inputs(torch.float32)
    torch.testing.assert_close(SkewForwardKLLoss(alpha=0.0)(s, t, labels), ForwardKLLoss()(s, t, labels))
    torch.testing.assert_close(SkewReverseKLLoss(alpha=0.0)(s, t, labels), ReverseKLLoss()(s, t, labels))


def test_masked_vocabulary_with_minus_inf_logits_stays_finite():
    s, t, _ = _inputs(torch.float32)
    t[..., -3:] = float("-inf")
    s.requires_grad_(True)
    out = ForwardKLLoss()(s, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: ForwardKLLoss(temperature=0.0), "loss.temperature"),
        (lambda: ForwardKLLoss(temperature=-1.0), "loss.temperature"),
        (lambda: GeneralizedJSDLoss(beta=1.5), "loss.beta"),
        (lambda: SkewForwardKLLoss(alpha=-0.1), "loss.alpha"),
        (lambda: SymmetricKLLoss(weight=2.0), "loss.weight"),
    ],
)
def test_bad_parameters_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        ForwardKLLoss()(torch.zeros(2, 5), torch.zeros(2, 6))


def test_a_subclass_writes_only_the_divergence():
    class L1Probs(DistillationLoss):
        def divergence(self, student_logits, teacher_logits):
            return (student_logits.softmax(-1) - teacher_logits.softmax(-1)).abs().sum(-1)

    s, t, labels = _inputs(torch.float32)
    torch.testing.assert_close(L1Probs()(s, t, labels), 2 * TVDLoss()(s, t, labels))
