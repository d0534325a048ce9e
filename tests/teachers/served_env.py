"""What the real-server tests share (their fixtures are in conftest.py): the marks of such a module, the tiny
model the session serves, its served name and context."""

from __future__ import annotations

import pytest

from distilkit.teachers.vllm_launcher import vllm_python

VLLM_PYTHON = vllm_python()
#: Marks for a module of real-server tests.
NEEDS_VLLM = [
    pytest.mark.served,
    pytest.mark.slow,
    pytest.mark.skipif(
        VLLM_PYTHON is None or not VLLM_PYTHON.exists(),
        reason="no vLLM environment: run `bash .ci/vllm-env` (or set DISTILKIT_VLLM_PYTHON to its python)",
    ),
]

#: A 2-layer Llama (head size 64, which vLLM's CPU attention supports), random weights with a wide init so
#: that the distributions are peaked enough for top-k to matter.
TINY_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
#: The served model's name and the server's context length.
SERVED_NAME, SERVED_CONTEXT = "tiny-llama", 256
