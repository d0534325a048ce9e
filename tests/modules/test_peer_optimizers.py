"""PeerOptimizers and PeerSchedulers: one optimizer and scheduler per peer, seen as one of each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distilkit.modules import PeerOptimizers, PeerSchedulers


def _peers():
    torch.manual_seed(0)
    return nn.Linear(3, 2), nn.Linear(3, 4)


def _step(peers, optimizer, which):
    optimizer.zero_grad()
    for index in which:
        peers[index](torch.ones(1, 3)).sum().backward()
    optimizer.step()


def test_one_step_updates_the_peers_that_hold_gradients_each_with_its_own_optimizer():
    peers = _peers()
    alone = [torch.optim.AdamW(p.parameters(), lr=lr) for p, lr in zip(peers, (0.1, 0.01), strict=True)]
    twins = [nn.Linear(3, 2), nn.Linear(3, 4)]
    for twin, peer in zip(twins, peers, strict=True):
        twin.load_state_dict(peer.state_dict())
    cohort = PeerOptimizers(
        [torch.optim.AdamW(t.parameters(), lr=lr) for t, lr in zip(twins, (0.1, 0.01), strict=True)]
    )
    assert [g["lr"] for g in cohort.param_groups] == [0.1, 0.01], "every peer's groups, the same dicts"

    _step(twins, cohort, which=[1])  # peer 0 holds no gradient: untouched, its optimizer state empty
    alone[1].zero_grad()
    peers[1](torch.ones(1, 3)).sum().backward()
    alone[1].step()
    assert torch.equal(twins[0].weight, peers[0].weight) and not cohort.optimizers[0].state
    assert torch.equal(twins[1].weight, peers[1].weight)
    assert set(cohort.state) == set(twins[1].parameters()), "state reads each peer's optimizer's"


def test_the_state_dict_holds_every_peer_and_loads_back():
    peers = _peers()
    cohort = PeerOptimizers([torch.optim.AdamW(p.parameters(), lr=0.1) for p in peers])
    schedulers = PeerSchedulers(
        cohort, [torch.optim.lr_scheduler.LinearLR(cohort.optimizers[0], total_iters=4), None]
    )
    _step(peers, cohort, which=[0, 1])
    schedulers.step()
    state, sched_state = cohort.state_dict(), schedulers.state_dict()
    assert len(state["peers"]) == 2 and sched_state["peers"][1] is None

    fresh = PeerOptimizers([torch.optim.AdamW(p.parameters(), lr=0.1) for p in peers])
    fresh_schedulers = PeerSchedulers(
        fresh, [torch.optim.lr_scheduler.LinearLR(fresh.optimizers[0], total_iters=4), None]
    )
    fresh.load_state_dict(state)
    fresh_schedulers.load_state_dict(sched_state)
    for param in cohort.state:
        torch.testing.assert_close(fresh.state[param]["exp_avg"], cohort.state[param]["exp_avg"])
    assert fresh.param_groups[0]["lr"] == cohort.param_groups[0]["lr"] != 0.1
    with pytest.raises(ValueError, match="cohort of 3 peers"):
        PeerOptimizers([*fresh.optimizers, torch.optim.SGD(nn.Linear(1, 1).parameters())]).load_state_dict(
            state
        )


def test_a_parameter_in_two_peers_optimizers_is_refused():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="more than one peer"):
        PeerOptimizers(
            [torch.optim.SGD(layer.parameters(), lr=0.1), torch.optim.SGD(layer.parameters(), lr=0.1)]
        )
