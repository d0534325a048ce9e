"""Results kept by content, so that a command interrupted after some of its work redoes only the rest.

``distilkit evaluate`` scores model after model; each model's row is kept under a key made of what
determines it (the model's and teacher's content hashes, the data's identity, the settings), in
``$DISTILKIT_CACHE/evaluate/<key>.json``. Run again, the command reuses the rows whose key it finds and
scores the others: after Ctrl-C, after a crash, or simply when one model is added to the list. A kept row
carries its own SHA-256: one changed since it was written is scored again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from distilkit.data.verified import cache_root, content_sha256
from distilkit.files import write_text

#: Bump when what a kept row holds changes meaning (the metrics, their names): older rows are not reused.
ROWS_VERSION = 1


def identity_of(spec: str | None) -> str | None:
    """What a model argument is: its content hash when it is a file or directory, else the name itself (a hub
    name); None for none."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return content_sha256(path) if path.exists() else spec


class KeptRows:
    """JSON rows by key in one directory (default ``$DISTILKIT_CACHE/<kind>``), each written atomically."""

    def __init__(self, kind: str, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else cache_root() / kind

    @staticmethod
    def key(**parts: Any) -> str:
        """A key for the JSON values ``parts``."""
        text = json.dumps({"version": ROWS_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> dict[str, Any] | None:
        """The row kept under ``key``, or None: none kept, or one whose bytes changed since it was written
        (its SHA-256 is kept with it), which is then made again."""
        try:
            kept = json.loads((self.directory / f"{key}.json").read_text(encoding="utf-8"))
            row, digest = kept["row"], kept["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return row if isinstance(row, dict) and _digest(row) == digest else None

    def put(self, key: str, row: dict[str, Any]) -> None:
        write_text(self.directory / f"{key}.json", json.dumps({"row": row, "sha256": _digest(row)}) + "\n")


def _digest(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()
