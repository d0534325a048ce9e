"""JSON over HTTP to a teacher's server (standard library only): a keep-alive connection per thread, and
retries with exponential backoff once the server has answered.

- A server that never answered: the first failure is a one-line
  :class:`~distilkit.errors.ConfigError` naming the URL (nothing to wait for at start).
- After that, a failed exchange (connection refused or reset, a timeout, a truncated body, HTTP 5xx, 408 or
  429) is retried, waiting ``backoff_s`` and doubling up to ``max_backoff_s``, for ``retry_for_s`` seconds
  from the request's first failure; then :class:`TeacherUnavailable`. :meth:`JsonClient.close` ends the
  waits at once.
- Any other 4xx is :class:`Refused` (not retried): the caller says what it means.
- A body that is not JSON is a ConfigError: nothing is returned from a garbled answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Any

from distilkit.errors import ConfigError, TrainingStopped

#: HTTP statuses worth retrying (with 5xx): request timeout, too many requests.
RETRY_STATUSES = frozenset({408, 429})
_START_FIX = (
    "start the server (python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P; "
    "README: a teacher behind a server) or fix teacher.server"
)


class TeacherUnavailable(TrainingStopped):
    """The teacher's server stopped answering for longer than the retry window; the message is one line.

    A subclass of :class:`~distilkit.errors.TrainingStopped`, so the CLI prints it as one line and exits 1.
    """


class Refused(Exception):
    """The server refused a request (a 4xx status other than 408/429); ``message`` is its reason, one line."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        super().__init__(f"HTTP {status}: {message}")


class JsonClient:
    """JSON requests to one server, safe to use from several threads.

    Args:
        url: the base URL, ``http(s)://host[:port][/prefix]``.
        timeout_s: seconds one exchange may take before it counts as failed.
        retry_for_s: how long a request's failures are retried before :class:`TeacherUnavailable`.
        backoff_s: the first wait between tries; it doubles after each failure, up to ``max_backoff_s``.
        max_backoff_s: the longest wait between tries.
    """

    #: What :meth:`_setup` makes and a pickled copy makes anew (threads, locks, connections).
    _RUNTIME = frozenset({"_local", "_connections", "_lock", "_closing"})

    def __init__(
        self, url: str, timeout_s: float, retry_for_s: float, backoff_s: float, max_backoff_s: float
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                "teacher.server", url, "is not an http(s) URL", "give e.g. http://127.0.0.1:8000"
            )
        for field, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s)):
            if not value > 0:
                raise ConfigError(f"teacher.{field}", value, "must be positive", "give seconds, e.g. 1")
        if not (retry_for_s >= 0 and max_backoff_s >= backoff_s):
            raise ConfigError(
                "teacher.retry_for_s",
                (retry_for_s, max_backoff_s),
                "must be >= 0 with max_backoff_s >= backoff_s",
                "give seconds, e.g. retry_for_s=300, max_backoff_s=30",
            )
        self.url, self.timeout_s, self.retry_for_s = url.rstrip("/"), timeout_s, retry_for_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self.answered = False  # whether the server ever answered: before that, a failure is a config error
        self._setup()

    def _setup(self) -> None:
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set by close(): requests waiting to retry give up at once

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer to one request, retried as the module says.

        Raises:
            ConfigError: no server answers at ``url`` (and none ever did), or the answer is not JSON.
            Refused: the server refused the request (4xx).
            TeacherUnavailable: failures went on for ``retry_for_s`` seconds, or the client was closed.
        """
        data = None if body is None else json.dumps(body).encode()
        first_failure, wait, tries = 0.0, self.backoff_s, 0
        while True:
            tries += 1
            try:
                status, payload = self._send(method, path, data)
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, truncated
                failure = f"{type(err).__name__}: {err}".rstrip(": ")
                self._drop_connection()
                if not self.answered:
                    raise ConfigError(
                        "teacher.server", self.url, f"does not answer ({failure})", _START_FIX
                    ) from None
            else:
                self.answered = True
                if status == 200:
                    return _decode(payload, self.url, path)
                message = error_message(payload)
                if status < 500 and status not in RETRY_STATUSES:
                    raise Refused(status, message)
                failure = f"HTTP {status}: {message}"
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure >= self.retry_for_s:
                raise TeacherUnavailable(
                    f"the teacher server {self.url} failed {tries} tries over {now - first_failure:.0f} s "
                    f"(retried for up to {self.retry_for_s:g} s; last: {failure})"
                )
            if self._closing.wait(min(wait, max(0.0, first_failure + self.retry_for_s - now))):
                raise TeacherUnavailable(f"the client of {self.url} was closed while retrying ({failure})")
            wait = min(2 * wait, self.max_backoff_s)

    def open(self) -> None:
        """Allow retries again after :meth:`close` (the client is reusable)."""
        self._closing.clear()

    def close(self) -> None:
        """End the waits of requests that are retrying, and close every connection."""
        self._closing.set()
        with self._lock:
            for connection in self._connections:
                if connection.sock is not None:  # wakes a thread blocked reading an answer
                    with contextlib.suppress(OSError):
                        connection.sock.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    # -------------------------------------------------------------------------------------------- helpers
    def _send(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        """One exchange on this thread's keep-alive connection. A reused connection that the server closed
        meanwhile (uvicorn drops idle ones after 5 s) is replaced once at once, without counting a failure."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        while True:
            connection, reused = self._connection()
            try:
                connection.request(method, self._prefix + path, body=data, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()  # read() raises IncompleteRead on a truncated body
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop_connection()
                if not reused:
                    raise

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=self.timeout_s)
        self._local.connection = connection
        with self._lock:
            self._connections.append(connection)
        return connection, False

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
            with self._lock:
                if connection in self._connections:
                    self._connections.remove(connection)

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: a copy in another process opens its own connections."""
        return {key: value for key, value in self.__dict__.items() if key not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()


def error_message(payload: bytes) -> str:
    """A server's error message on one line (vLLM answers ``{"error": {"message": …}}``)."""
    try:
        decoded = json.loads(payload)
        message = decoded["error"]["message"] if isinstance(decoded.get("error"), dict) else decoded
    except (ValueError, AttributeError, KeyError, TypeError):
        message = payload[:300].decode(errors="replace")
    return " ".join(str(message).split())


def _decode(payload: bytes, url: str, path: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        raise ConfigError(
            "teacher.server", url, f"answered {path} with something that is not JSON", "see the server's log"
        ) from None
