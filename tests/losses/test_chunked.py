"""The chunked loss's default path (closed-form CE + forward KL, autograd for the rest) vs the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_module

from distilkit import DistillationModule
from distilkit.losses import (
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TVDLoss,
)
from distilkit.losses.chunked import HeadLossPlan, chunk_slices, head_losses
from distilkit.losses.closed_form import cross_entropy_and_forward_kl
from distilkit.models.heads import OutputHead

LOSSES = [
    ForwardKLLoss(),
    ForwardKLLoss(temperature=2.0),
    ReverseKLLoss(temperature=2.0),
    SymmetricKLLoss(weight=0.3),
    GeneralizedJSDLoss(beta=0.4),
    SkewForwardKLLoss(alpha=0.1),
    SkewReverseKLLoss(alpha=0.1),
    TVDLoss(),
    LogitMSELoss(),
]


def _loss_and_grads(module, batch):
    module.zero_grad()
    losses = module.compute_loss(batch)
    losses["loss"].backward()
    return losses, {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}


def _assert_same(module, batch, chunk_size):
    module.chunk_size = None  # the reference: full logits, autograd
    reference, reference_grads = _loss_and_grads(module, batch)
    module.chunk_size = chunk_size
    got, grads = _loss_and_grads(module, batch)
    assert got.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: f"{type(loss).__name__}-T{loss.temperature:g}")
def test_default_path_equals_reference_for_every_divergence(datamodule, loss):
    """124 tokens in chunks of at most 50 (42, 41, 41); forward KL in closed form, the others by autograd."""
    torch.manual_seed(0)
    module = tiny_module(datamodule, loss=loss, kd_ratio=0.3).eval()  # eval: no dropout between the runs
    batch = next(iter(datamodule.train_dataloader()))
    assert module.loss.has_closed_form() == (type(loss) is ForwardKLLoss)
    _assert_same(module, batch, chunk_size=50)


def test_default_path_without_a_teacher_equals_reference(datamodule):
    module = tiny_module(datamodule, teacher=None).eval()
    _assert_same(module, next(iter(datamodule.train_dataloader())), chunk_size=33)


def test_a_subclass_with_its_own_terms_keeps_them(datamodule):
    """A subclass's terms built on the module's own (closed form inside) are differentiated by autograd."""

    class Doubled(DistillationModule):
        def loss_terms(self, student_logits, teacher, labels):
            return {
                name: 2 * value for name, value in super().loss_terms(student_logits, teacher, labels).items()
            }

    module = tiny_module(datamodule, cls=Doubled).eval()
    batch = next(iter(datamodule.train_dataloader()))
    _assert_same(module, batch, chunk_size=50)
    plain = tiny_module(datamodule, student=module.student, teacher=module.teacher).eval()
    torch.testing.assert_close(module.compute_loss(batch)["loss"], 2 * plain.compute_loss(batch)["loss"])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_closed_form_matches_autograd_in_float64(temperature):
    """Values and gradient of the fused CE + forward KL against autograd on the definitions, a masked
    vocabulary entry (teacher logit -inf) included, with weights on the two terms."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    t[:, 4] = float("-inf")
    labels = torch.randint(0, 11, (6,), generator=g)
    fused = s.float().clone().requires_grad_(True)
    ce, kd = cross_entropy_and_forward_kl(fused, t.float(), labels, temperature)
    (0.3 * ce + 0.7 * kd).backward()

    x = s.clone().requires_grad_(True)
    want_ce = F.cross_entropy(x, labels)
    p, log_q = (t / temperature).softmax(-1), (x / temperature).log_softmax(-1)
    want_kl = (p * (p.clamp_min(1e-300).log() - log_q)).sum(-1).mean() * temperature**2
    (0.3 * want_ce + 0.7 * want_kl).backward()
    torch.testing.assert_close(ce.double(), want_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.double(), want_kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.grad.double(), x.grad, rtol=1e-5, atol=1e-7)


def test_closed_form_through_a_scaled_head_equals_reference():
    """A head with a logit scale (Cohere, Granite): the closed form's gradient goes through the scale."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(23, 8, generator=g)
    head = OutputHead(torch.randn(13, 8, generator=g), torch.randn(13, generator=g), vocab_size=13, scale=0.5)
    teacher = torch.randn(23, 13, generator=g)
    labels = torch.randint(0, 13, (23,), generator=g)
    loss, weights = ForwardKLLoss(temperature=2.0), {"ce_loss": 0.4, "kd_loss": 0.6}

    def terms(student_logits, teacher_logits, labels):
        kd, ce = loss.kd_and_ce(student_logits, teacher_logits, labels)
        return {"ce_loss": ce, "kd_loss": kd}

    def run(chunk_size):
        weight, bias = head.weight.clone().requires_grad_(True), head.bias.clone().requires_grad_(True)
        plan = HeadLossPlan(
            student_head=OutputHead(weight, bias, 13, scale=0.5),
            teacher=lambda rows, out=None: teacher[rows],
            labels=labels, terms=terms, names=("ce_loss", "kd_loss"), weights=weights, chunk_size=chunk_size,
        )  # fmt: skip
        x = features.clone().requires_grad_(True)
        losses = head_losses(x, plan)
        losses["loss"].backward()
        return losses["loss"], x.grad, weight.grad, bias.grad

    for got, want in zip(run(4), run(None), strict=True):  # chunks of 4: the closed form; None: autograd
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("total,size", [(0, 5), (1, 5), (10, 5), (11, 5), (124, 50), (7, None), (3, 1)])
def test_chunk_slices_are_few_contiguous_and_even(total, size):
    slices = list(chunk_slices(total, size))
    lengths = [s.stop - s.start for s in slices]
    assert slices[0].start == 0 and slices[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:], strict=False))
    assert len(slices) == (1 if size is None or total == 0 else -(-total // size))
    assert max(lengths) - min(lengths) <= 1 and (size is None or max(lengths) <= size)


def test_a_forward_kl_that_overrides_forward_or_is_hooked_takes_autograd():
    """The closed form would skip an override of ``forward`` or a hook on the loss: those are not plain."""

    class DoubledKL(ForwardKLLoss):
        def forward(self, student_logits, teacher_logits, labels=None):
            return 2 * super().forward(student_logits, teacher_logits, labels)

    assert ForwardKLLoss().has_closed_form()
    assert not DoubledKL().has_closed_form()
    hooked = ForwardKLLoss()
    hooked.register_forward_hook(lambda module, args, output: output)
    assert not hooked.has_closed_form()
