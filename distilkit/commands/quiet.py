"""Quiet by default: what other libraries print that a distilkit user can neither act on nor needs, silenced
once, here, each with its reason.

What distilkit can fix at the source it fixes there (the CLI parses its own command line, so LightningCLI's
warning about ``args`` never fires; checkpoints are written with ``weights_only`` given; progress bars of
short jobs are not drawn: :mod:`distilkit.data.progress`). What it cannot is filtered by its exact message,
never by category or module: a new warning from the same library still shows. What a user needs stays:
Lightning's lines about devices, the seed, why a fit stopped, and every warning distilkit itself gives.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: ``(message pattern, why it is noise)`` of Python warnings that are filtered.
NOISE_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r".*isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own use of a torch API (lightning/pytorch/utilities/_pytree.py); no user can change it",
    ),
    (
        r".*module\(s\) in eval mode",
        "the frozen teacher is in eval mode on purpose; Lightning warns about every such module",
    ),
    (
        r".*The dirpath has changed from",
        "validate/test/predict load a fit's checkpoint; their checkpoint callback writes nothing",
    ),
    (
        r".*Using ModelCheckpoint with manual optimization and every_n_train_steps",
        "a cohort (manual optimization) is checkpointed after its step on purpose: the step counter is past "
        "it too, so a resume is exact (tests/modules/test_mutual.py); the advice is for another design",
    ),
    (
        r".*Checkpoint directory .* exists and is not empty",
        "a fit refuses a directory holding a run unless it resumes it, and a resumed run's has checkpoints",
    ),
)

#: Filtered only where it is known to be wrong: a data module that keeps its place in its own state.
RESUMABLE_DATA_WARNING = r".*You're resuming from a checkpoint that ended before the epoch ended"

#: Beginnings of Lightning's informational lines that are advertisements, not information about the run.
NOISE_INFO: tuple[str, ...] = ("💡 Tip:",)


class DropInfo(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...] = NOISE_INFO) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.prefixes)


#: The loggers Lightning's ``rank_zero_info`` writes to.
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def one_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """distilkit's own warnings as one line, ``warning: <message>`` (Python's format adds the file, the line
    number, the category and the source line: three things a user does not act on); others as they were."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        return f"warning: {message}\n"
    return _FORMAT(message, category, filename, lineno, line)


PACKAGE = Path(__file__).resolve().parents[1]
_FORMAT = warnings.formatwarning


def quiet_third_party() -> None:
    """Install the filters above and the one-line format of distilkit's warnings (idempotent); the CLI calls
    it before any command runs."""
    global _FORMAT
    if warnings.formatwarning is not one_line:
        _FORMAT, warnings.formatwarning = warnings.formatwarning, one_line
    for pattern, _why in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropInfo) for f in logger.filters):
            logger.addFilter(DropInfo())


@contextmanager
def log_levels(levels: dict[str, int]) -> Iterator[None]:
    """Set loggers' levels (``{name: level}``) for the block, and give each its own level back after it (a
    command run from Python leaves the caller's logging as it found it)."""
    previous = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
