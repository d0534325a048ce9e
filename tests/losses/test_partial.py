"""Rows without a teacher learn from their labels alone: PartialTargets against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilkit.losses import ForwardKLLoss, ReverseKLLoss
from distilkit.losses.chunked import HeadLossPlan, head_losses
from distilkit.losses.partial import PartialTargets
from distilkit.models.heads import OutputHead


def _case(n: int = 9, vocab: int = 11):
    torch.manual_seed(0)
    student = torch.randn(n, vocab, requires_grad=True)
    teacher = torch.randn(n, vocab)
    labels = torch.randint(vocab, (n,))
    taught = torch.tensor([True, False, True, True, False, False, True, True, False])[:n]
    return student, teacher, labels, taught


def _by_hand(loss, student, teacher, labels, taught, temperature):
    """Per row: the divergence where taught (T²·D(s/T, t/T)), the row's CE where not; CE everywhere."""
    ce = F.cross_entropy(student, labels, reduction="none")  # (n,)
    t = temperature
    if isinstance(loss, ForwardKLLoss):
        rows = F.softmax(teacher / t, -1) * (F.log_softmax(teacher / t, -1) - F.log_softmax(student / t, -1))
    else:
        rows = F.softmax(student / t, -1) * (F.log_softmax(student / t, -1) - F.log_softmax(teacher / t, -1))
    kd_rows = torch.where(taught, rows.sum(-1) * t * t, ce)
    return kd_rows.mean(), ce.mean()


@pytest.mark.parametrize("loss_class", [ForwardKLLoss, ReverseKLLoss])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_untaught_rows_put_their_cross_entropy_in_the_kd_term(loss_class, temperature):
    student, teacher, labels, taught = _case()
    loss = loss_class(temperature=temperature)
    partial = PartialTargets(taught, teacher[taught], int(taught.sum()))
    kd, ce = loss.kd_and_ce(student, partial, labels)
    want_kd, want_ce = _by_hand(loss, student, teacher, labels, taught, temperature)
    torch.testing.assert_close(kd, want_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
    # a row's total is its CE whatever kd_ratio: the gradient at untaught rows is CE's alone
    a = 0.7
    (grad,) = torch.autograd.grad((1 - a) * ce + a * kd, student)
    (want,) = torch.autograd.grad((1 - a) * want_ce + a * want_kd, student)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(student, labels, reduction="sum") / len(labels), student)
    torch.testing.assert_close(grad[~taught], ce_grad[~taught], rtol=1e-5, atol=1e-7)


def test_no_row_taught_is_plain_cross_entropy():
    student, _, labels, _ = _case()
    kd, ce = ForwardKLLoss().kd_and_ce(
        student, PartialTargets(torch.zeros(9, dtype=torch.bool), None, 0), labels
    )
    torch.testing.assert_close(ce, F.cross_entropy(student, labels))
    torch.testing.assert_close(kd, ce)


def test_the_chunked_loss_with_its_closed_form_matches_the_reference_path():
    """Partial chunks inside the chunk loop (ForwardKL's closed form on the taught rows) give the unchunked
    reference's loss and gradients."""
    torch.manual_seed(1)
    n, hidden, vocab = 9, 6, 11
    features = torch.randn(n, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    _, teacher, labels, taught = _case(n, vocab)
    head = OutputHead(weight=weight, bias=None, vocab_size=vocab)
    loss = ForwardKLLoss(temperature=2.0)

    def targets(rows: slice, out=None):
        mask = taught[rows]
        return PartialTargets(mask, teacher[rows][mask], int(mask.sum()))

    def terms(student_logits, chunk, chunk_labels):
        kd, ce = loss.kd_and_ce(student_logits, chunk, chunk_labels)
        return {"ce_loss": ce, "kd_loss": kd}

    results = []
    for chunk_size in (None, 4):
        plan = HeadLossPlan(
            student_head=head, teacher=targets, labels=labels, terms=terms, names=("ce_loss", "kd_loss"),
            weights={"ce_loss": 0.5, "kd_loss": 0.5}, chunk_size=chunk_size,
        )  # fmt: skip
        losses = head_losses(features, plan)
        grads = torch.autograd.grad(losses["loss"], (features, weight))
        results.append((losses["loss"].detach(), losses["kd_loss"], *grads))
    for reference, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-6)
