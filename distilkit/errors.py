"""The one exception type for mistakes a user can fix.

The CLI prints a ``ConfigError`` as a single line and exits with status 2, with no traceback: the message
names the field, the value that was given and what to do instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class ConfigError(ValueError):
    """A bad setting or input. Built from the field, the value and the fix, so every message reads alike.

    Example:
        >>> raise ConfigError("model.kd_ratio", 1.5, "must lie in [0, 1]", "set a value such as 0.5")
    """

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field}={value!r}: {problem}; {fix}.")


@contextmanager
def fields_as_typed(names: Mapping[str, str]) -> Iterator[None]:
    """Errors raised inside about a field of ``names`` (or one below it) name what the user typed instead:
    ``{"data.train_files": "data_files"}`` turns ``data.train_files='x.txt': is empty`` into
    ``data_files='x.txt': is empty`` where a command builds the data module from its own ``--data_files``."""
    try:
        yield
    except ConfigError as err:
        given = next((g for g in names if err.field == g or err.field.startswith(_below(g))), None)
        if given is None:
            raise
        problem, fix = err.problem, err.fix
        for other, typed in names.items():
            problem, fix = problem.replace(other, typed), fix.replace(other, typed)
        raise ConfigError(names[given] + err.field[len(given) :], err.value, problem, fix) from err


def _below(field: str) -> tuple[str, ...]:
    return (f"{field}.", f"{field}[", f"{field} ", f"{field}:")


def check_range(field: str, value: float, low: float, high: float, *, open_low: bool = False) -> float:
    """Return ``value`` if it lies in ``[low, high]`` (``(low, high]`` with ``open_low``), else raise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(field, value, f"is not a number in [{low}, {high}]", "give a number in that range")
    below = value <= low if open_low else value < low
    if below or value > high:
        bracket = "(" if open_low else "["
        raise ConfigError(
            field, value, f"must lie in {bracket}{low}, {high}]", "choose a value in that range"
        )
    return value


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (for example on a non-finite loss); the message says where and why.

    The CLI prints it as one line and exits with status 1; nothing from the failing step is saved.
    """


class RunInterrupted(RuntimeError):
    """The user stopped a run (Ctrl-C); the message says what was saved. The CLI exits with status 130."""
