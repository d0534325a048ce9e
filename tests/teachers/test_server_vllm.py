"""The served teacher's client against a REAL vLLM CPU server on 127.0.0.1 (marked ``served``; the session's
one server, see conftest.py): a tiny random Llama the session writes, scored by vLLM, must give the targets
that transformers' float32 log-softmax gives for the same model in distilkit's environment.

Needs the vLLM environment (``bash .ci/vllm-env``; found through ``$DISTILKIT_VLLM_PYTHON`` or its stamp
under ``${DISTILKIT_CACHE:-~/.cache/distilkit}``); skipped with that reason without it.
"""

from __future__ import annotations

import json

import pytest
import torch
from served_env import NEEDS_VLLM, SERVED_NAME
from tcp_proxy import TcpProxy

from distilkit.data.teacher_cache.codec import topk_targets
from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.errors import ConfigError
from distilkit.losses import ForwardKLLoss, ReverseKLLoss
from distilkit.teachers.server import ServedTeacher, TeacherUnavailable

pytestmark = NEEDS_VLLM
NAME, K, T = SERVED_NAME, 20, 128


@pytest.fixture(scope="module")
def reference(vllm_model_dir, corpus):
    """Blocks of real text ``(4, T)`` and the same model's float32 log-probabilities ``(4, T, V)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    text = " ".join(json.loads(line)["text"] for line in corpus.read_text().splitlines())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: 4 * T]
    blocks = torch.tensor(ids).view(4, T)  # (B, T)
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(blocks).logits.float()  # (B, T, V)
    return tokenizer, blocks, logits


def test_served_targets_equal_transformers_top_k(vllm_server, reference):
    """vLLM's top-20 at every position (the last one included) are transformers' float32 top-20 with the
    same log-probabilities, tail mass and actual-token log p, within float tolerance."""
    tokenizer, blocks, logits = reference
    with ServedTeacher(vllm_server.url, NAME, top_k=K) as teacher:
        info = teacher.check(tokenizer, block_size=T)
        scores = teacher.submit(blocks).result()
    assert info.model == NAME and info.max_model_len == 256
    targets = scores.targets
    assert targets.ids.shape == (4, T, K) and targets.tail.shape == (4, T)
    log_p = logits.log_softmax(-1)  # (B, T, V)
    torch.testing.assert_close(log_p.gather(-1, targets.ids), targets.log_probs, atol=2e-4, rtol=0)
    top = log_p.topk(K + 1, dim=-1).values  # (B, T, K+1)
    assert (targets.log_probs[..., -1] >= top[..., K] - 2e-4).all()  # the served ids are a true top K
    same = (targets.ids == log_p.topk(K, dim=-1).indices).all(-1).float().mean()
    assert same > 0.95, f"only {same:.1%} of positions have the same top-{K} ids in the same order"
    outside = log_p.scatter(-1, targets.ids, float("-inf")).logsumexp(-1)  # (B, T)
    torch.testing.assert_close(targets.tail.exp(), outside.exp(), atol=1e-4, rtol=1e-3)
    actual = log_p[:, :-1].gather(-1, blocks[:, 1:, None]).squeeze(-1)  # (B, T-1)
    torch.testing.assert_close(scores.next_token, actual, atol=2e-4, rtol=0)


def test_losses_train_from_the_server_as_from_a_top_k_cache(vllm_server, reference):
    """Sparse losses on the server's targets equal those on the cache's own targets of the same logits."""
    tokenizer, blocks, logits = reference
    with ServedTeacher(vllm_server.url, NAME, top_k=K, vocab_size=len(tokenizer), max_in_flight=2) as teacher:
        served = teacher.score(blocks).select(blocks)  # (N, K)
    rows = [topk_targets(block_logits, K, 1.0) for block_logits in logits]
    cached = SparseTargets(
        "topk", *(torch.stack([r[i] for r in rows]) for i in (0, 1)), tail=torch.stack([r[2] for r in rows])
    ).select(blocks)
    student = torch.randn(served.ids.shape[0], len(tokenizer), generator=torch.Generator().manual_seed(0))
    for loss in (ForwardKLLoss(), ReverseKLLoss()):
        torch.testing.assert_close(
            loss.sparse_forward(student, served), loss.sparse_forward(student, cached), atol=1e-3, rtol=1e-3
        )


def test_the_real_server_refuses_what_differs(vllm_server, reference, tokenizer_dir):
    """A K above vLLM's default --max-logprobs (20), an unknown model name, a block filling its context,
    and a run tokenizer that is not the model's: each one ConfigError line naming it."""
    from transformers import AutoTokenizer

    tokenizer, _, _ = reference
    cases = [
        (ServedTeacher(vllm_server.url, NAME, top_k=21), tokenizer, T, "--max-logprobs 21"),
        (ServedTeacher(vllm_server.url, "other", top_k=K), tokenizer, T, "is not served"),
        (ServedTeacher(vllm_server.url, NAME, top_k=K), tokenizer, 256, "--max-model-len 257"),
        (
            ServedTeacher(vllm_server.url, NAME, top_k=K),
            AutoTokenizer.from_pretrained(tokenizer_dir),
            T,
            "probe",
        ),
    ]
    for teacher, run_tokenizer, block_size, words in cases:
        with teacher, pytest.raises(ConfigError) as caught:
            teacher.check(run_tokenizer, block_size=block_size)
        assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_server_lost_mid_run_raises_teacher_unavailable(vllm_server, reference):
    """The server goes away (a proxy in front of it cuts every connection and refuses new ones, as a dead
    process would); the client retries for its window, then raises the one-line TeacherUnavailable."""
    tokenizer, blocks, _ = reference
    proxy = TcpProxy(vllm_server.port)
    with ServedTeacher(proxy.url, NAME, top_k=K, vocab_size=len(tokenizer), retry_for_s=3) as teacher:
        teacher.score(blocks[:1])
        proxy.cut()
        with pytest.raises(TeacherUnavailable, match=f"{proxy.url} failed .* tries over") as caught:
            teacher.score(blocks[:1])
    assert "\n" not in str(caught.value)
