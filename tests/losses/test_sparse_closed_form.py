"""The closed-form CE + forward KL against sparse targets equals autograd through the definitions (the
reference path), for top-k (with and without a tail, with tail draws) and sampled targets, with and without
temperature; the chunked loss uses it inside the chunk loop, in the workspace's buffers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilkit.data.teacher_cache.codec import sample_targets, topk_targets
from distilkit.losses import ForwardKLLoss, SparseTargets
from distilkit.losses import sparse_closed_form as closed
from distilkit.losses.chunked import HeadLossPlan, head_losses
from distilkit.losses.sparse_closed_form import cross_entropy_and_sparse_forward_kl
from distilkit.losses.workspace import Workspace
from distilkit.models.heads import OutputHead

N, V = 12, 40
KINDS = ["topk", "topk K=V", "topk+draws", "sample"]


def make_targets(kind: str, teacher: torch.Tensor, temperature: float) -> SparseTargets:
    g = torch.Generator().manual_seed(3)
    n = teacher.shape[0]
    if kind == "sample":
        ids, log_probs = sample_targets(teacher, torch.rand(n, 9, generator=g), temperature)
        weights = torch.full(ids.shape, 1 / 9)
        return SparseTargets("sample", ids, log_probs, weights=weights, temperature=temperature)
    if kind == "topk+draws":
        ids, log_probs, tail = topk_targets(teacher, 6, temperature, torch.rand(n, 5, generator=g))
        weights = torch.cat([log_probs[:, :6].exp(), tail.exp().unsqueeze(-1).expand(n, 5) / 5], -1)
        return SparseTargets(
            "topk", ids, log_probs, tail=tail, weights=weights, temperature=temperature, tail_draws=5
        )
    ids, log_probs, tail = topk_targets(teacher, V if kind == "topk K=V" else 6, temperature)
    return SparseTargets("topk", ids, log_probs, tail=tail, temperature=temperature)


def logits(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * torch.empty(n, 1).uniform_(0.5, 5.0, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_equals_the_reference_loss_and_gradient(kind: str, temperature: float) -> None:
    """Values and gradient of the fused function against ``sparse_forward_and_ce`` (autograd through the
    bucket log-probabilities), with weights on the two terms; and against the plain definitions in float64."""
    teacher, student = logits(0), logits(1)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    targets = make_targets(kind, teacher, temperature)
    loss = ForwardKLLoss(temperature=temperature)

    fused = student.clone().requires_grad_(True)
    ce, kd = cross_entropy_and_sparse_forward_kl(fused, targets, labels, temperature)
    (0.3 * ce + 0.7 * kd).backward()

    reference = student.clone().requires_grad_(True)
    want_kd, want_ce = loss.sparse_forward_and_ce(reference, targets, labels)
    (0.3 * want_ce + 0.7 * want_kd).backward()
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, want_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.grad, reference.grad, rtol=1e-5, atol=1e-7)

    # the definitions, in float64: the target distribution p̃ (the draws' weights, or the normalised buckets
    # with the tail spread over the other ids in proportion to q) against q at T
    x = student.double().requires_grad_(True)
    log_q = (x / temperature).log_softmax(-1)
    if targets.weights is not None:
        p_tilde = torch.zeros(N, V, dtype=torch.float64).scatter_add_(
            1, targets.ids, targets.weights.double()
        )
        kl = (targets.weights.double() * (targets.log_probs.double() - log_q.gather(1, targets.ids))).sum(-1)
    else:
        buckets = torch.cat([targets.log_probs, targets.tail.unsqueeze(-1)], -1).double()
        buckets = buckets[:, :V] if kind == "topk K=V" else buckets
        p_hat = buckets.log_softmax(-1).exp()  # (N, K+1)
        head = torch.zeros(N, V, dtype=torch.float64).scatter_(1, targets.ids, 1.0).bool()
        q = log_q.exp().detach()
        tail_q = (q * ~head).sum(-1, keepdim=True)
        p_tilde = torch.zeros(N, V, dtype=torch.float64).scatter_(1, targets.ids, p_hat[:, : targets.entries])
        if kind == "topk":
            p_tilde = p_tilde + p_hat[:, -1:] * q * ~head / tail_q
        kl = (p_tilde * (p_tilde.clamp_min(1e-300).log() - log_q)).sum(-1)
    want = 0.3 * F.cross_entropy(x, labels) + 0.7 * kl.mean() * temperature**2
    want.backward()
    grad = 0.3 * (x.softmax(-1) - F.one_hot(labels, V)) / N
    grad = grad + 0.7 * temperature * (log_q.exp() - p_tilde).detach() / N
    torch.testing.assert_close(x.grad, grad, rtol=1e-6, atol=1e-9)  # the closed form is the gradient
    torch.testing.assert_close(fused.grad.double(), grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close((0.3 * ce + 0.7 * kd).double(), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_the_chunk_loop_uses_the_closed_form_and_equals_the_reference_path(
    kind: str, temperature: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a head in chunks (the closed form, in the workspace's buffers) and unchunked (autograd): the
    same loss and gradients for features, weight and bias."""
    g = torch.Generator().manual_seed(4)
    features, weight, bias = torch.randn(23, 8, generator=g), torch.randn(V, 8, generator=g), torch.randn(V)
    targets = make_targets(kind, logits(5, 23), temperature)
    labels = torch.randint(0, V, (23,), generator=g)
    loss, weights = ForwardKLLoss(temperature=temperature), {"ce_loss": 0.4, "kd_loss": 0.6}
    calls = []
    apply = closed._CrossEntropyAndSparseForwardKL.apply
    monkeypatch.setattr(
        closed._CrossEntropyAndSparseForwardKL, "apply", lambda *a: calls.append(1) or apply(*a)
    )

    def terms(student_logits, teacher, labels):
        kd, ce = loss.kd_and_ce(student_logits, teacher, labels)
        return {"ce_loss": ce, "kd_loss": kd}

    def run(chunk_size, workspace=None):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        plan = HeadLossPlan(
            student_head=OutputHead(w, b, V), teacher=lambda rows, out=None: targets[rows], labels=labels,
            terms=terms, names=("ce_loss", "kd_loss"), weights=weights, chunk_size=chunk_size,
            workspace=workspace,
        )  # fmt: skip
        x = features.clone().requires_grad_(True)
        losses = head_losses(x, plan)
        losses["loss"].backward()
        return losses["loss"], losses["kd_loss"], x.grad, w.grad, b.grad

    workspace = Workspace()
    chunked = run(8, workspace)
    assert len(calls) == 3, "three chunks, each through the closed form"
    buffers = {name: tensor.data_ptr() for name, tensor in workspace._buffers.items()}
    assert any(name.endswith("log_q") for name in buffers)
    assert run(8, workspace)[0] == chunked[0] and buffers == {
        name: tensor.data_ptr() for name, tensor in workspace._buffers.items()
    }, "the next step reuses the same buffers"
    calls.clear()
    reference = run(None)
    assert not calls, "the reference path keeps autograd"
    for got, want in zip(chunked, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_subclass_of_the_forward_kl_keeps_autograd_on_sparse_targets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forward KL whose divergence is overridden is not the closed form's: its own formula is used."""

    class Halved(ForwardKLLoss):
        def draw_divergence(self, log_p, log_q):
            return 0.5 * super().draw_divergence(log_p, log_q)

        def divergence(self, student_logits, teacher_logits):
            return 0.5 * super().divergence(student_logits, teacher_logits)

    targets = make_targets("sample", logits(6), 1.0)
    student, labels = logits(7), torch.randint(0, V, (N,))
    with Workspace().lent():
        halved, _ = Halved().kd_and_ce(student, targets, labels)
        full, _ = ForwardKLLoss().kd_and_ce(student, targets, labels)
    torch.testing.assert_close(halved, 0.5 * full)
