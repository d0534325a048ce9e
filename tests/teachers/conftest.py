"""One real vLLM CPU server per test session, shared by the ``served`` tests (test_server_vllm.py,
test_served_vllm.py): its start (1-5 minutes here) is paid once. It serves a tiny random Llama the session
writes, with the project's tokenizer (recipes/teacher). Without the vLLM environment (``bash .ci/vllm-env``;
``$DISTILKIT_VLLM_PYTHON``) the tests that use it are skipped, saying so."""

from __future__ import annotations

import pytest
import torch
from served_env import SERVED_CONTEXT, SERVED_NAME, TINY_LLAMA, VLLM_PYTHON

from distilkit.teachers.vllm_launcher import VLLMServer


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """The tiny Llama as a Hugging Face directory, with the tokenizer of recipes/teacher."""
    from helpers import TEACHER, tiny_model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tokenizer, {**TINY_LLAMA, **ids})


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """The vLLM server of the tiny Llama on 127.0.0.1, started once; stopped (its whole process group) at the
    end of the session."""
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = VLLMServer(
        vllm_model_dir,
        python=VLLM_PYTHON,
        served_model_name=SERVED_NAME,
        max_model_len=SERVED_CONTEXT,
        log_path=log,
    )
    server.start(timeout=900)
    memory = server.memory_bytes() / 2**30
    print(f"vLLM ready in {server.ready_seconds:.0f} s, {memory:.2f} GiB (PSS, all its processes)")
    yield server
    server.stop()
    assert not server.healthy(), "the server still answers after stop()"
