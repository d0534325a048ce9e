"""Distillation metrics against direct computations, and their reduction across two processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distilkit.metrics import DistillationKL, TokenPerplexity, TopKAgreement


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(40, 17, generator=g)
    teacher = torch.randn(40, 17, generator=g)
    labels = torch.randint(0, 17, (40,), generator=g)
    return student, teacher, labels


def _direct(student, teacher, labels):
    ppl = torch.exp(F.cross_entropy(student.double(), labels))
    top1 = (student.argmax(-1) == teacher.argmax(-1)).double().mean()
    top3 = (student.topk(3, -1).indices == teacher.argmax(-1, keepdim=True)).any(-1).double().mean()
    p, log_p, log_q = (
        teacher.double().softmax(-1),
        teacher.double().log_softmax(-1),
        student.double().log_softmax(-1),
    )
    kl = (p * (log_p - log_q)).sum(-1).mean()
    return ppl, top1, top3, kl


def _update_all(metrics, student, teacher, labels, chunk: int = 7):
    ppl, top1, top3, kl = metrics
    for start in range(0, labels.numel(), chunk):
        rows = slice(start, start + chunk)
        ppl.update(F.cross_entropy(student[rows], labels[rows], reduction="none"))
        top1.update(student[rows], teacher[rows])
        top3.update(student[rows], teacher[rows])
        kl.update(student[rows], teacher[rows])


def test_each_metric_equals_a_direct_computation_when_updated_in_chunks():
    student, teacher, labels = _data()
    metrics = (TokenPerplexity(), TopKAgreement(k=1), TopKAgreement(k=3), DistillationKL())
    _update_all(metrics, student, teacher, labels)
    for metric, expected in zip(metrics, _direct(student, teacher, labels), strict=True):
        torch.testing.assert_close(metric.compute().double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=0"):
        TopKAgreement(k=0)


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    student, teacher, labels = _data()
    half = slice(0, 23) if rank == 0 else slice(23, 40)  # unequal halves: sums, not means, must reduce
    metrics = (TokenPerplexity(), TopKAgreement(k=1), TopKAgreement(k=3), DistillationKL())
    _update_all(metrics, student[half], teacher[half], labels[half])
    values = [float(m.compute()) for m in metrics]
    dist.destroy_process_group()
    results[rank] = values


@pytest.mark.slow
def test_two_process_reduction_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    expected = [float(v) for v in _direct(*_data())]
    for rank in (0, 1):
        assert results[rank] == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_is_the_nll_in_bits_over_the_bytes_of_the_text(datamodule):
    """``val/bpb`` = Σ NLL / (ln 2 · Σ UTF-8 bytes of the predicted tokens), computed by hand on one batch."""
    import math

    import lightning as L
    from helpers import tiny_module

    from distilkit.batch import next_token_targets

    module = tiny_module(datamodule, teacher=None).eval()
    batch = next(iter(datamodule.val_dataloader()))
    metrics = L.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=1).validate(
        module, datamodule, verbose=False
    )[0]
    keep, labels = next_token_targets(batch["labels"])
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"])[:, :-1][keep]
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    special = set(datamodule.tokenizer.all_special_ids)
    text_bytes = sum(
        len(datamodule.tokenizer.decode([int(t)]).encode()) for t in labels if int(t) not in special
    )  # the corpus is ASCII: every token decodes alone to its own bytes
    assert metrics["val/bpb"] == pytest.approx(float(nll) / (math.log(2) * text_bytes), rel=1e-4)
