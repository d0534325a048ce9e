"""A teacher behind an inference server: blocks of token ids in, the sparse targets of a top-k cache out.

:class:`ServedTeacher` talks to a vLLM OpenAI-compatible server (``python -m
vllm.entrypoints.openai.api_server``, see :mod:`distilkit.teachers.vllm_launcher`) over plain HTTP, one
request per block, several in flight from a bounded thread pool::

    teacher = ServedTeacher("http://127.0.0.1:8000", "teacher", top_k=20)
    teacher.check(tokenizer, block_size=256)      # identity: the model's name, its tokenizer, K, the length
    pending = teacher.submit(batch["input_ids"])  # (B, T); requests go out now (look-ahead)
    targets = pending.result().targets            # SparseTargets "topk": ids/log_probs (B, T, K), tail (B, T)

The targets are exactly what a top-k teacher cache holds at temperature 1 (how the answer is read, and how
the actual next token is kept, is in :mod:`distilkit.teachers.vllm_answer`).

**Identity, not trust.** :meth:`ServedTeacher.check` compares the served model's name (``/v1/models``),
the server's tokenization of a probe text (``/tokenize``) with the run's tokenizer, the server's context
length with the block size, and scores the probe at K (a K above the server's ``--max-logprobs`` is
refused there). A difference is a one-line :class:`~distilkit.errors.ConfigError` naming it; so is an
answer that is garbled or has the wrong shape, at any time.

**Faults** (:mod:`distilkit.teachers.http_json`). A server that never answered (no check, no score yet) is
a ConfigError naming the URL. Once it has answered, a failed request (connection refused or reset, a
timeout, a truncated answer, HTTP 5xx, 408 or 429) is retried with exponential backoff for ``retry_for_s``
seconds from its first failure, then :class:`TeacherUnavailable` is raised: the trainer turns it into
"write last.ckpt and exit non-zero with one line". Nothing is returned from a partial answer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.errors import ConfigError
from distilkit.teachers.http_json import JsonClient, Refused, TeacherUnavailable
from distilkit.teachers.vllm_answer import (
    MODEL_FIX,
    TOKENIZER_FIX,
    AnswerError,
    BlockScores,
    read_scores,
    refusal,
    scoring_request,
)

__all__ = ["PROBE_TEXT", "PendingScores", "ServedScores", "ServedTeacher", "ServerInfo", "TeacherUnavailable"]

#: The text whose tokenization must match the run's tokenizer: words, spaces, digits, code, accents, CJK
#: and an emoji, so that a different vocabulary or normalisation shows.
PROBE_TEXT = (
    "The teacher's tokenizer must match the student's:  tabs\tand\nnewlines, 3.14159 and 1,000,000; "
    "def f(x): return x ** 2  # naïve café, Ünïcödé, 東京, Москва, 🙂."
)


class Tokenizer(Protocol):
    """What :meth:`ServedTeacher.check` needs of the run's tokenizer (a Hugging Face tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ServerInfo:
    """What :meth:`ServedTeacher.check` learnt: the model's name, its context length, the probe's ids."""

    model: str
    max_model_len: int | None
    probe_ids: tuple[int, ...]


@dataclass(frozen=True)
class ServedScores:
    """A batch's answers.

    Attributes:
        targets: ``SparseTargets("topk")`` with ids/log_probs ``(B, T, K)`` and tail ``(B, T)``: position t
            holds the teacher's prediction of token t + 1 (the last position: of the token after the block).
        next_token: ``(B, T − 1)`` float32 log p of the actual next token x_{t+1} at position t.
    """

    targets: SparseTargets
    next_token: Tensor


class PendingScores:
    """One batch's requests in flight; :meth:`result` waits for all of them (or raises the first error)."""

    def __init__(self, futures: list[Future[BlockScores]]) -> None:
        self._futures = futures

    def done(self) -> bool:
        return all(future.done() for future in self._futures)

    def cancel(self) -> None:
        """Drop the requests that have not started (an answer nobody will read)."""
        for future in self._futures:
            future.cancel()

    def result(self) -> ServedScores:
        try:
            blocks = [future.result() for future in self._futures]
        except BaseException:
            for future in self._futures:
                future.cancel()
            raise
        ids = torch.from_numpy(np.stack([b.ids for b in blocks]))  # (B, T, K)
        log_probs = torch.from_numpy(np.stack([b.log_probs for b in blocks]))  # (B, T, K)
        tail = torch.from_numpy(np.stack([b.tail for b in blocks]))  # (B, T)
        next_token = torch.from_numpy(np.stack([b.next_token for b in blocks]))  # (B, T-1)
        return ServedScores(SparseTargets("topk", ids, log_probs, tail=tail), next_token)


class ServedTeacher:
    """A client of a vLLM server that scores blocks of token ids into top-k sparse targets.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        model: the served model's name (``--served-model-name``, or the ``--model`` path by default).
        top_k: K, the log-probabilities kept per position (at most the server's ``--max-logprobs``, 20 by
            default).
        vocab_size: V, the run's vocabulary; every returned id must lie below it (default: the length of
            the tokenizer given to :meth:`check`; required when scoring without a check).
        max_in_flight: the most requests outstanding at once (the thread pool's size); :meth:`submit` waits
            for a free slot.
        timeout_s: seconds one request may take before it counts as failed.
        retry_for_s: how long failures are retried, from the first failure of a request, before
            :class:`TeacherUnavailable`.
        backoff_s: the first wait between tries; it doubles after each failure, up to ``max_backoff_s``.
        max_backoff_s: the longest wait between tries.
    """

    def __init__(
        self,
        url: str,
        model: str,
        top_k: int = 20,
        vocab_size: int | None = None,
        max_in_flight: int = 4,
        timeout_s: float = 300.0,
        retry_for_s: float = 300.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._http = JsonClient(url, timeout_s, retry_for_s, backoff_s, max_backoff_s)
        _positive_int("teacher.top_k", top_k)
        _positive_int("teacher.max_in_flight", max_in_flight)
        if vocab_size is not None:
            _positive_int("teacher.vocab_size", vocab_size)
        self.url, self.model, self.top_k, self.vocab_size = self._http.url, model, top_k, vocab_size
        self.max_in_flight = max_in_flight
        self._setup()

    #: What :meth:`_setup` makes and a pickled copy makes anew (the thread pool and its lock).
    _RUNTIME = frozenset({"_lock", "_slots", "_pool"})

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------------------- identity
    def check(self, tokenizer: Tokenizer, block_size: int | None = None) -> ServerInfo:
        """Compare the server with the run: the model's name, the probe text's ids, the context, K.

        Args:
            tokenizer: the run's tokenizer; its length becomes ``vocab_size`` unless one was given.
            block_size: T, the run's block length; the server's context must hold T + 1 tokens (the block
                and the one generated token that scores the last position).

        Raises:
            ConfigError: the first difference, in one line.
        """
        if self.vocab_size is None:
            self.vocab_size = len(tokenizer)
        self._http.open()
        cards = self._request("GET", "/v1/models").get("data")
        names = [card.get("id") for card in cards or [] if isinstance(card, dict)]
        if self.model not in names:
            raise ConfigError(
                "teacher.model",
                self.model,
                f"is not served at {self.url} (it serves {names})",
                MODEL_FIX,
            )
        max_len = next(card.get("max_model_len") for card in cards if card.get("id") == self.model)
        if block_size is not None and isinstance(max_len, int) and block_size + 1 > max_len:
            raise ConfigError(
                "data.block_size",
                block_size,
                f"needs a server context of {block_size + 1} tokens, and {self.url} serves {max_len}",
                f"start the server with --max-model-len {block_size + 1} or more (and "
                "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 when that is one more than the model's own context: the one "
                "generated token is never fed back), or shorten the blocks",
            )
        probe = _probe_text(tokenizer)
        served = self._request("POST", "/tokenize", {"model": self.model, "prompt": probe, **_NO_SPECIAL})
        ours = list(tokenizer.encode(probe, add_special_tokens=False))
        theirs = served.get("tokens")
        if theirs != ours:
            raise ConfigError("teacher.server", self.url, _tokenizer_difference(ours, theirs), TOKENIZER_FIX)
        self.score([ours[: max_len - 1] if isinstance(max_len, int) else ours])  # K, the answer's shape
        return ServerInfo(self.model, max_len, tuple(ours))

    # ------------------------------------------------------------------------------------------- scoring
    def score(self, blocks: Tensor | Sequence[Sequence[int]], top_k: int | None = None) -> SparseTargets:
        """The top-k targets of ``blocks`` ``(B, T)``: ids/log_probs ``(B, T, K)``, tail ``(B, T)``."""
        return self.submit(blocks, top_k).result().targets

    def submit(
        self,
        blocks: Tensor | Sequence[Sequence[int]],
        top_k: int | None = None,
        wait_for_slots: bool = True,
    ) -> PendingScores:
        """Send one request per block now (waiting only for free slots) and return the pending answers.

        Args:
            blocks: ``(B, T)`` token ids (a tensor, or B sequences of T ids).
            top_k: K for these blocks (default: the teacher's ``top_k``).
            wait_for_slots: wait until fewer than ``max_in_flight`` requests are outstanding before queueing
                each block. False queues them at once (still at most ``max_in_flight`` are sent at a time):
                for a caller that bounds what it queues itself, such as a look-ahead.
        """
        rows = blocks.tolist() if isinstance(blocks, Tensor) else [list(map(int, row)) for row in blocks]
        if not rows or len({len(row) for row in rows}) != 1 or not rows[0]:
            raise ValueError(f"blocks should be (B, T) with B, T >= 1, got lengths {[len(r) for r in rows]}")
        k = self.top_k if top_k is None else _positive_int("teacher.top_k", top_k)
        if self.vocab_size is None:
            raise ConfigError(
                "teacher.vocab_size", None, "is unknown", "call check(tokenizer) first or pass vocab_size"
            )
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._http.open()
                    self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="served-teacher")
        futures = []
        for row in rows:
            if wait_for_slots:
                self._slots.acquire()
            future = self._pool.submit(self._score_block, row, k)
            if wait_for_slots:
                future.add_done_callback(lambda _: self._slots.release())
            futures.append(future)
        return PendingScores(futures)

    def _score_block(self, prompt: list[int], top_k: int) -> BlockScores:
        answer = self._request("POST", "/v1/completions", scoring_request(self.model, prompt, top_k))
        assert self.vocab_size is not None
        try:
            return read_scores(answer, prompt, top_k, self.vocab_size)
        except AnswerError as err:
            raise ConfigError(
                "teacher.server", self.url, f"gave a garbled answer: it {err}", "see the server's log"
            ) from None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request (retried by :class:`JsonClient`); a refusal read as the ConfigError it means."""
        try:
            return self._http.request(method, path, body)
        except Refused as err:
            prompt = body.get("prompt") if body else None
            length = len(prompt) if isinstance(prompt, list) else None
            raise refusal(self.url, self.model, err.status, err.message, length) from None

    def close(self) -> None:
        """Stop the thread pool (requests waiting to retry give up at once) and close the connections."""
        self._http.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ServedTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: a copy in another process (a data-loader worker) opens its own connections."""
        return {key: value for key, value in self.__dict__.items() if key not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()


_NO_SPECIAL = {"add_special_tokens": False}


def _positive_int(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, value, "must be a positive integer", "give e.g. 20")
    return value


def _probe_text(tokenizer: Tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    return PROBE_TEXT + (eos if isinstance(eos, str) else "")


def _tokenizer_difference(ours: list[int], theirs: Any) -> str:
    if not isinstance(theirs, list):
        return "did not tokenize the probe text (no 'tokens' in its /tokenize answer)"
    common = min(len(ours), len(theirs))
    at = next((i for i in range(common) if ours[i] != theirs[i]), common)
    mine = ours[at] if at < len(ours) else "end"
    served = theirs[at] if at < len(theirs) else "end"
    return (
        f"tokenizes the probe text into {len(theirs)} ids where the run's tokenizer gives {len(ours)} "
        f"(first difference at token {at}: server {served}, run {mine})"
    )
