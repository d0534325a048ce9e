"""A teacher behind an inference server as a teacher source: ``teacher: {server: URL, model: NAME, top_k:
K}``.

:class:`ServedTeacherSource` sends each batch's blocks to a vLLM server (through the client
:class:`~distilkit.teachers.server.ServedTeacher`) and hands out the answers as the sparse targets a top-k
teacher cache holds (the K most likely ids, their log p, the tail's mass; temperature 1), so every loss that
trains from a cache trains from a server, and no teacher weights are in the training process.

**Look-ahead.** With a data module, the loaders it gives are read ``look_ahead`` batches ahead
(:class:`~distilkit.data.read_ahead.ReadAhead`, installed by
:class:`~distilkit.teachers.look_ahead.LookAhead`): each batch's blocks go to the server as soon as the
batch is read, so the server scores the next batches while the student trains on this one; at most
``look_ahead`` batches beyond the current one are in flight, and at most ``max_in_flight`` requests are
sent at a time. A batch is handed to the step only once its
answers are in, so a server that fails surfaces between two steps: the CLI then writes ``last.ckpt`` of the
last finished step (:class:`~distilkit.run.signals.CheckpointOnTeacherUnavailable`) and a resumed run
continues exactly. Without a data module (loaders passed to ``fit``) each batch is scored in its step.

**Identity, not trust.** Before the first step :meth:`ServedTeacherSource.check_run` compares the served
model's name, its tokenization of a probe text with the data's tokenizer, its context with the block size
and its limit on K (``--max-logprobs``); a difference is one line. A partial or garbled answer is refused
(one line), never trained on.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback
from torch import Tensor

from distilkit.batch import Batch
from distilkit.data.read_ahead import ReadAhead
from distilkit.errors import ConfigError
from distilkit.teachers.base import Split, TeacherSource
from distilkit.teachers.cache import CachedTeaching
from distilkit.teachers.look_ahead import LookAhead
from distilkit.teachers.server import PendingScores, ServedScores, ServedTeacher, ServerInfo

#: The keys of a served teacher's mapping, with their defaults (``server`` and ``model`` are required).
SETTINGS: dict[str, Any] = {
    "top_k": 20,
    "look_ahead": 2,
    "max_in_flight": 8,
    "timeout_s": 300.0,
    "retry_for_s": 300.0,
    "backoff_s": 1.0,
    "max_backoff_s": 30.0,
}
REQUIRED = ("server", "model")


def is_served(spec: Any) -> bool:
    """Whether ``model.teacher`` names a teacher behind a server (a mapping with ``server``)."""
    return isinstance(spec, Mapping) and "server" in spec


@dataclass
class WaitClock:
    """How long a split's batches waited for the server's answers, after they were due."""

    seconds: float = 0.0
    batches: int = 0


@dataclass(eq=False)
class _InFlight:
    key: bytes
    answer: PendingScores | ServedScores


@dataclass
class _Queue:
    """One split's batches sent ahead, in the order they were read; the oldest are dropped past ``limit``
    (batches read ahead that the loop never asked for: a run stopping at ``max_steps``, a validation cut
    short by ``limit_val_batches``)."""

    limit: int
    entries: deque[_InFlight] = field(default_factory=deque)

    def add(self, key: bytes, pending: PendingScores) -> None:
        self.entries.append(_InFlight(key, pending))
        while len(self.entries) > self.limit:
            _drop(self.entries.popleft())

    def find(self, key: bytes) -> _InFlight | None:
        """The oldest entry of ``key``; entries read before it are stale (never asked for) and dropped."""
        for index, entry in enumerate(self.entries):
            if entry.key == key:
                for _ in range(index):
                    _drop(self.entries.popleft())
                return entry
        return None

    def remove(self, entry: _InFlight) -> None:
        if entry in self.entries:
            self.entries.remove(entry)

    def clear(self) -> None:
        while self.entries:
            _drop(self.entries.popleft())


def _drop(entry: _InFlight) -> None:
    if isinstance(entry.answer, PendingScores):
        entry.answer.cancel()


class ServedTeacherSource(TeacherSource):
    """A vLLM server's top-K log-probabilities as the teacher's targets (see the module docstring).

    Args:
        server: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        model: the served model's name (``--served-model-name``; by default vLLM serves the ``--model`` path).
        top_k: K, log-probabilities per position (at most the server's ``--max-logprobs``, 20 by default).
        vocab_size: V, the run's logit width: every returned id must lie below it.
        look_ahead: batches read and sent ahead of the one training (0: none; each batch is still scored
            before its step starts).
        max_in_flight: requests (one per block) sent to the server at a time.
        timeout_s: seconds one request may take before it counts as failed.
        retry_for_s: how long a failing request is retried (backoff from ``backoff_s`` doubling up to
            ``max_backoff_s``) before the run stops with
            :class:`~distilkit.teachers.server.TeacherUnavailable`.
        backoff_s: the first wait between tries.
        max_backoff_s: the longest wait between tries.
        field: the config field it came from, named in errors.
    """

    targets = "topk"
    full_distribution = False
    temperature = 1.0

    def __init__(
        self,
        server: str,
        model: str,
        top_k: int = SETTINGS["top_k"],
        vocab_size: int | None = None,
        look_ahead: int = SETTINGS["look_ahead"],
        max_in_flight: int = SETTINGS["max_in_flight"],
        timeout_s: float = SETTINGS["timeout_s"],
        retry_for_s: float = SETTINGS["retry_for_s"],
        backoff_s: float = SETTINGS["backoff_s"],
        max_backoff_s: float = SETTINGS["max_backoff_s"],
        field: str = "model.teacher",
    ) -> None:
        super().__init__()
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{field}.model", model, "must name the served model", "give e.g. teacher")
        if not (isinstance(look_ahead, int) and not isinstance(look_ahead, bool) and look_ahead >= 0):
            raise ConfigError(f"{field}.look_ahead", look_ahead, "must be an integer >= 0", "give e.g. 2")
        self.client = ServedTeacher(
            server, model, top_k, vocab_size, max_in_flight, timeout_s, retry_for_s, backoff_s, max_backoff_s
        )
        self.field, self.look_ahead = field, look_ahead
        if vocab_size is not None:
            self.vocab_size = vocab_size
        self.info: ServerInfo | None = None
        self.waits = {"train": WaitClock(), "val": WaitClock()}
        self._queues = {split: _Queue(look_ahead + 2) for split in self.waits}

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], vocab_size: int, field: str = "model.teacher"
    ) -> ServedTeacherSource:
        """The source a ``{server, model, top_k, ...}`` mapping describes (unknown keys are refused)."""
        unknown = sorted(set(spec) - set(REQUIRED) - set(SETTINGS))
        if unknown:
            raise ConfigError(
                f"{field}.{unknown[0]}",
                spec[unknown[0]],
                "is not a setting of a served teacher",
                f"use {', '.join([*REQUIRED, *SETTINGS])}",
            )
        missing = [key for key in REQUIRED if not spec.get(key)]
        if missing:
            raise ConfigError(
                f"{field}.{missing[0]}",
                spec.get(missing[0]),
                "is needed for a teacher behind a server",
                "give {server: http://HOST:PORT, model: NAME, top_k: K}",
            )
        return cls(**spec, vocab_size=vocab_size, field=field)

    @property
    def top_k(self) -> int:
        return self.client.top_k

    # -------------------------------------------------------------------------------------------- scoring
    def teach(self, batch: Batch, split: Split, hidden: bool = False) -> CachedTeaching:
        """The server's targets of ``batch``'s blocks ``(B, T, K)`` on the batch's device (waiting for them
        if they are not in yet)."""
        if hidden:
            raise ConfigError(
                "model.hidden_loss",
                "a served teacher",
                "has no hidden states",
                "drop hidden_loss, or train live",
            )
        entry = self._answered(batch, split)
        self._queues[split].remove(entry)
        assert isinstance(entry.answer, ServedScores)
        return CachedTeaching(entry.answer.targets.to(batch["input_ids"].device))

    def send(self, batch: Batch, split: Split) -> None:
        """Send ``batch``'s blocks to the server now (a look-ahead reads a batch): its answers are kept
        until :meth:`ready` or :meth:`teach` asks for them."""
        blocks = _blocks(batch, self.field)
        self._queues[split].add(_key(blocks), self.client.submit(blocks, wait_for_slots=False))

    def ready(self, batch: Batch, split: Split) -> ServedScores:
        """``batch``'s answers, waiting for them (and sending them first if :meth:`send` did not); the wait
        is added to :attr:`waits`.

        Raises:
            TeacherUnavailable: the server failed for longer than ``retry_for_s``.
            ConfigError: the server refused the blocks or answered something garbled.
        """
        answer = self._answered(batch, split).answer
        assert isinstance(answer, ServedScores)
        return answer

    def _answered(self, batch: Batch, split: Split) -> _InFlight:
        """``batch``'s entry in its split's queue, its answers in (sent now if they were not)."""
        blocks = _blocks(batch, self.field)
        key = _key(blocks)
        queue = self._queues[split]
        entry = queue.find(key)
        if entry is None:
            entry = _InFlight(key, self.client.submit(blocks, wait_for_slots=False))
            queue.entries.appendleft(entry)
        if isinstance(entry.answer, PendingScores):
            start = time.perf_counter()
            entry.answer = entry.answer.result()
            clock = self.waits[split]
            clock.seconds += time.perf_counter() - start
            clock.batches += 1
        return entry

    def read_ahead(self, loader: Iterable[Any], split: Split) -> ReadAhead[Any]:
        """``loader`` read :attr:`look_ahead` batches ahead, each batch sent as it is read and answered
        before it is handed out."""
        return ReadAhead(
            loader,
            self.look_ahead,
            on_read=lambda batch: self.send(batch, split),
            on_yield=lambda batch: self.ready(batch, split),
        )

    def drop_pending(self) -> None:
        """Forget every batch sent ahead (their requests not yet started are cancelled)."""
        for queue in self._queues.values():
            queue.clear()

    def close(self) -> None:
        """Drop what is pending and stop the client (requests retrying give up at once)."""
        self.drop_pending()
        self.client.close()

    # ------------------------------------------------------------------------------------------- checks
    def check_run(self, trainer: Any, module: Any, stage: str) -> None:
        """Compare the server with the run before any step: the model's name, the data tokenizer's ids of a
        probe text, the context against the block size, K against the server's limit (one-line errors)."""
        super().check_run(trainer, module, stage)
        data = getattr(trainer, "datamodule", None)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                "data",
                type(data).__name__,
                "has no tokenizer to compare with the served teacher's",
                "train with distilkit.TextDataModule (or a data module with a `tokenizer`)",
            )
        self.check_server(tokenizer, getattr(data, "block_size", None))

    def check_server(self, tokenizer: Any, block_size: int | None) -> ServerInfo:
        """The server's identity against the run's ``tokenizer`` and ``block_size`` (see
        :meth:`~distilkit.teachers.server.ServedTeacher.check`); a difference is a one-line ConfigError."""
        self.info = self.client.check(tokenizer, block_size=block_size)
        return self.info

    def identity(self) -> dict[str, Any]:
        """``kind``, the server's ``url``, the served ``model`` name and ``top_k``."""
        return {"kind": "server", "url": self.client.url, "model": self.client.model, "top_k": self.top_k}

    def callbacks(self) -> list[Callback]:
        """The look-ahead over the data module's loaders."""
        return [LookAhead(self)]

    def __getstate__(self) -> dict[str, Any]:
        """Settings only (a copy in another process starts with nothing in flight)."""
        state = dict(self.__dict__)
        state["_queues"] = {split: _Queue(self.look_ahead + 2) for split in self.waits}
        return state


def _blocks(batch: Batch, field: str) -> Tensor:
    """The batch's ``(B, T)`` token ids, as the server is to score them (each row one sequence)."""
    if batch.get("position_ids") is not None:
        raise ConfigError(
            field,
            "a served teacher",
            "scores each block as one sequence, and this batch packs several conversations per row",
            "train from plain text, or use a live teacher or a teacher cache for chat data",
        )
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ConfigError(
            field,
            "a served teacher",
            "needs blocks whose padding (if any) comes last",
            "pad on the right, as distilkit.TextDataModule does",
        )
    return batch["input_ids"]


def _key(blocks: Tensor) -> bytes:
    """A content key of ``(B, T)`` ids: a batch sent ahead is found again by what it holds."""
    ids = blocks.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(str(tuple(ids.shape)).encode(), digest_size=16)
    digest.update(ids.numpy().tobytes())
    return digest.digest()
