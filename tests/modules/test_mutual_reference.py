"""The cohort's updates against a plain deep-mutual-learning loop written with full logits and autograd:
the chunked loss, each peer's own AdamW (weight decay included) stepped once per batch on that peer alone,
per-peer clipping, one scheduler step per batch, and (alternate) the target re-run after the update."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_trainer
from lightning.pytorch.callbacks import Callback
from test_mutual import SMALL, WIDER, _cohort, _model, _state

from distilkit.batch import next_token_targets


class Batches(Callback):
    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


def _logits(model, batch, keep):
    return model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]  # (N, V)


def _loss(logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """(1 − ratio)·CE + ratio·KL(softmax(target) ‖ softmax(logits)), means over the N positions."""
    kl = F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")
    return (1 - ratio) * F.cross_entropy(logits, labels) + ratio * kl


@pytest.mark.parametrize("update", ["alternate", "simultaneous"])
def test_updates_match_a_plain_mutual_learning_loop(datamodule, tmp_path, update):
    """Three steps at kd_ratio 0.5 give the same weights as the loop below, to float rounding."""
    torch.manual_seed(0)
    peers = [_model(datamodule, SMALL), _model(datamodule, WIDER)]
    make_opt = partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.1)
    make_sched = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=3e-3, total_steps=3, pct_start=0.5)
    ref = [copy.deepcopy(p) for p in peers]
    cohort = _cohort(
        datamodule, [copy.deepcopy(p) for p in peers], kd_ratio=0.5, update=update, chunk_size=16,
        gradient_clip_val=0.5, optimizer=make_opt, lr_scheduler=make_sched,
    )  # fmt: skip
    record = Batches()
    tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[record]).fit(cohort, datamodule)

    opts = [make_opt(p.parameters()) for p in ref]
    scheds = [make_sched(o) for o in opts]
    for batch in record.batches:
        keep, labels = next_token_targets(batch["labels"])
        with torch.no_grad():
            before = [_logits(p, batch, keep) for p in ref]
        seen = list(before)
        for i in (0, 1):
            loss = _loss(_logits(ref[i], batch, keep), seen[1 - i], labels, 0.5)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref[i].parameters(), 0.5)
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)
            if update == "alternate":
                with torch.no_grad():
                    seen[i] = _logits(ref[i], batch, keep)
        for s in scheds:
            s.step()
    for peer, expected in zip(cohort.peers, ref, strict=True):
        torch.testing.assert_close(_state(peer), _state(expected), rtol=1e-4, atol=1e-5)
