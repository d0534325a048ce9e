"""Helpers shared by the benchmark scripts (not a test: they print measured ratios)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's distilkit, not another one installed in the environment
    sys.path.insert(0, str(ROOT))


def interleaved_medians(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each variant, run in turn (A, B, C, A, B, C, ...): drift hits all alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A Markdown table, ready for README."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every op torch has a formula for (``torch.utils.flop_counter.flop_registry``:
    matmuls, convolutions, attention), forward and backward, while active. (``FlopCounterMode`` itself also
    tracks modules with autograd hooks, which ``torch.autograd.grad`` inside the chunked loss refuses.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class StepCompute(Callback):
    """Measures, inside a training run, the FLOPs of one training step (forward and backward matmuls and
    attention, counted by :class:`FlopCount`) and the wall time of every step, and
    writes ``{"flops_per_step": ..., "step_seconds": [...]}`` to ``output`` (JSON) when training ends.

    Use it from the command line: ``--trainer.callbacks '[{"class_path": "_common.StepCompute",
    "init_args": {"output": "compute.json"}}]'`` (with ``benchmarks/`` on the import path).

    Args:
        output: the JSON file to write.
        flops_step: the (0-based) step whose FLOPs are counted (after the first, whose set-up differs).
    """

    def __init__(self, output: str, flops_step: int = 1) -> None:
        self.output, self.flops_step = Path(output), flops_step
        self.counter: FlopCount | None = None
        self.flops: int | None = None
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.global_step == self.flops_step and self.flops is None:
            self.counter = FlopCount()
            self.counter.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.flops, self.counter = self.counter.total, None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output.write_text(json.dumps({"flops_per_step": self.flops, "step_seconds": self.seconds}))
