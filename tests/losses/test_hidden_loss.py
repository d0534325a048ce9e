"""HiddenStateLoss alone and inside the module: equal and different widths, projections never exported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_STUDENT, TINY_TEACHER, tiny_module, tiny_trainer

from distilkit.errors import ConfigError
from distilkit.losses import HiddenStateLoss


def test_equal_widths_need_no_projection_and_match_the_formulas():
    loss = HiddenStateLoss({1: 2}, metric="mse")
    loss.bind(8, 8, 2, 2)
    assert len(loss.projections) == 0
    s = [torch.randn(2, 3, 8) for _ in range(3)]
    t = [torch.randn(2, 3, 8) for _ in range(3)]
    torch.testing.assert_close(loss(s, t), F.mse_loss(s[1], t[2]))
    cosine = HiddenStateLoss({1: 2}, metric="cosine")
    cosine.bind(8, 8, 2, 2)
    expected = (1 - F.cosine_similarity(s[1], t[2], dim=-1)).mean()
    torch.testing.assert_close(cosine(s, t), expected)
    assert cosine([t[2]] * 3, t).item() == pytest.approx(0.0, abs=1e-6)


def test_different_widths_learn_a_projection_and_respect_the_mask():
    loss = HiddenStateLoss({0: 0, 1: 2}, metric="mse")
    loss.bind(4, 6, 1, 2)
    assert set(loss.projections) == {"0", "1"}
    s = [torch.randn(2, 5, 4, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 5, 6) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    value = loss(s, t, mask)
    p0, p1 = loss.projections["0"], loss.projections["1"]
    expected = (F.mse_loss(p0(s[0][mask]), t[0][mask]) + F.mse_loss(p1(s[1][mask]), t[2][mask])) / 2
    torch.testing.assert_close(value, expected)
    value.backward()
    assert p0.weight.grad is not None and s[1].grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layer_map": {}}, "is empty"),
        ({"layer_map": {1: 1}, "metric": "l1"}, "hidden_loss.metric"),
        ({"layer_map": {1: 1}, "weight": -1.0}, "hidden_loss.weight"),
    ],
)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HiddenStateLoss(**kwargs)


def test_a_layer_beyond_the_model_is_refused(datamodule):
    with pytest.raises(ConfigError, match="student layer 5 does not exist"):
        tiny_module(datamodule, hidden_loss=HiddenStateLoss({5: 1}))


def test_in_the_module_it_adds_its_weighted_term_trains_and_is_never_exported(datamodule, tmp_path):
    hidden = HiddenStateLoss({1: 2}, metric="cosine", weight=0.5)
    module = tiny_module(datamodule, hidden_loss=hidden).eval()
    batch = next(iter(datamodule.train_dataloader()))
    losses = module.compute_loss(batch)
    assert "hidden_loss" in losses
    base = 0.5 * losses["ce_loss"] + 0.5 * losses["kd_loss"]
    torch.testing.assert_close(losses["loss"], base + 0.5 * losses["hidden_loss"])

    projection = hidden.projections["1"].weight
    before = projection.detach().clone()
    trainer = tiny_trainer(tmp_path, max_steps=3, enable_checkpointing=True)
    trainer.fit(module, datamodule)
    assert not torch.equal(before, projection.detach()), "the projection did not train"
    assert any(p is projection for g in trainer.optimizers[0].param_groups for p in g["params"])
    checkpoint = torch.load(
        trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path,
        weights_only=True,
    )
    assert any(k.startswith("hidden_loss.") for k in checkpoint["state_dict"])
    assert hidden.projections["1"].weight.shape == (TINY_TEACHER["n_embd"], TINY_STUDENT["n_embd"])
