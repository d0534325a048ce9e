"""The loss terms compiled with ``torch.compile``: one graph for every block size, cached on disk."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from distilkit.data.text import default_cache_dir


def compile_cache_dir() -> str:
    """Where compiled loss graphs are kept between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
    ``torch_compile/`` under distilkit's cache (``$DISTILKIT_CACHE`` or ``~/.cache/distilkit``)."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(default_cache_dir() / "torch_compile")


class CompiledTerms:
    """``terms(student_logits (m, V), teacher, labels (m,))`` compiled by ``torch.compile``.

    The chunked loss calls the terms on blocks of rows whose number varies (the last block of a chunk, the
    number of valid tokens in a batch), so the rows dimension of every tensor argument is marked dynamic: one
    graph serves all of them instead of one compilation per size. Inductor's caches (the FX graph cache and
    AOTAutograd's, on by default) are kept under :func:`compile_cache_dir`, so only the first run on a machine
    pays the full compilation; later runs load the compiled graphs.

    Args:
        terms: the function to compile (the module's ``loss_terms``).
    """

    def __init__(self, terms: Any) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
        self.compiled = torch.compile(terms)

    def __call__(self, student_logits: Tensor, teacher: Any, labels: Tensor) -> dict[str, Tensor]:
        for tensor in (student_logits, teacher, labels):
            if isinstance(tensor, Tensor) and tensor.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.compiled(student_logits, teacher, labels)
