"""PeerMixture: the weighted mean of models' distributions, chunk by chunk, with no gradient into them."""

from __future__ import annotations

import pytest
import torch

from distilkit.models.heads import OutputHead
from distilkit.teachers.mixture import PeerMixture


def _heads_and_features(count: int, rows: int = 6, hidden: int = 5, vocab: int = 11):
    torch.manual_seed(0)
    heads = [OutputHead(torch.randn(vocab, hidden, requires_grad=True), None, vocab) for _ in range(count)]
    features = [torch.randn(rows, hidden, requires_grad=True) for _ in range(count)]
    return heads, features


def test_the_mixture_is_the_weighted_mean_of_the_distributions_in_every_chunk():
    heads, features = _heads_and_features(3)
    mixture = PeerMixture.of(features, heads, [1.0, 1.0, 2.0])
    probs = [torch.softmax(features[j] @ heads[j].weight.T, -1) for j in range(3)]  # (N, V) each
    expected = (probs[0] + probs[1] + 2 * probs[2]) / 4
    got = torch.cat([mixture(slice(0, 4)), mixture(slice(4, 6))]).exp()  # two chunks
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)
    assert not got.requires_grad, "no gradient flows into the models the mixture is made of"


def test_one_model_gives_its_own_logits_as_a_live_teacher_does():
    heads, features = _heads_and_features(1)
    mixture = PeerMixture.of(features, heads, [3.0])
    torch.testing.assert_close(mixture(slice(0, 6)), (features[0] @ heads[0].weight.T).detach())


def test_bad_weights_are_refused():
    heads, features = _heads_and_features(2)
    with pytest.raises(ValueError, match="positive"):
        PeerMixture.of(features, heads, [1.0, 0.0])
    with pytest.raises(ValueError, match="one head and one weight"):
        PeerMixture.of(features, heads, [1.0])
