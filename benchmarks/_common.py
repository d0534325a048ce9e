"""Helpers shared by the benchmark scripts (not a test: they print measured ratios)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
