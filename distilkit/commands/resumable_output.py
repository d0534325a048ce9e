"""A jsonl written batch by batch that a rerun of the same command continues, never duplicating a row.

While a command works, its rows go to ``OUT.partial`` (appended, flushed and fsynced after every batch)
and what the rows are made from goes to ``OUT.partial.json`` (its *settings*: the model's and the
inputs' content hashes and every setting that changes a row). When the command ends, ``OUT.partial``
is renamed to ``OUT`` and the settings file removed. Run again after an interruption with the same
settings, the command finds the rows already written and starts after them; a row torn by the
interruption (no newline yet) is dropped, and so is an incomplete last batch, so that every batch is
whole and a resumed output equals an uninterrupted one. Different settings are refused in one line
naming what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distilkit.errors import ConfigError
from distilkit.files import atomic_write


class ResumableJsonl:
    """The rows of one output file, written in whole batches and continued after an interruption.

    Args:
        output: the file the finished rows end up in.
        settings: what the rows are made from (JSON-serialisable); a partial file made from other settings
            is refused.
        overwrite: start again, discarding a partial file (and replacing ``output`` when done).
    """

    def __init__(self, output: Path, settings: dict[str, Any], overwrite: bool = False) -> None:
        self.output = output
        self.partial = output.with_name(output.name + ".partial")
        self.settings_file = output.with_name(output.name + ".partial.json")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        if overwrite:
            self.partial.unlink(missing_ok=True)
            self.settings_file.unlink(missing_ok=True)

    def resume(self, batch_size: int) -> list[dict[str, Any]]:
        """The rows already written by an interrupted run with these settings (whole batches of
        ``batch_size`` only; the file is cut back to them), or none; records the settings for a later
        resume."""
        if not self.partial.exists():
            self._start()
            return []
        recorded = self._recorded()
        if recorded != self.settings:
            raise ConfigError(
                "output_file",
                str(self.output),
                f"has an unfinished run in {self.partial} made with {_differences(recorded, self.settings)}",
                "rerun with the settings it was started with, or pass --overwrite true to start again",
            )
        data = self.partial.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a line without its newline was torn by the interruption
        lines = complete.decode("utf-8").splitlines(keepends=True)
        keep = len(lines) - len(lines) % batch_size
        with self.partial.open("r+b") as file:
            file.truncate(sum(len(line.encode("utf-8")) for line in lines[:keep]))
        return [json.loads(line) for line in lines[:keep]]

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append one batch of rows and make it durable (flush, fsync)."""
        with self.partial.open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            file.flush()
            os.fsync(file.fileno())

    def finish(self) -> Path:
        """Move the rows into ``output`` (atomically) and drop the settings file."""
        os.replace(self.partial, self.output)
        self.settings_file.unlink(missing_ok=True)
        return self.output

    def _start(self) -> None:
        with atomic_write(self.settings_file) as file:
            json.dump(self.settings, file, indent=1, sort_keys=True)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.partial.write_bytes(b"")

    def _recorded(self) -> Any:
        try:
            return json.loads(self.settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def _differences(recorded: Any, wanted: dict[str, Any]) -> str:
    """``another NAME (was, now ...)`` for each setting that differs (or why the recorded ones cannot be
    read)."""
    if not isinstance(recorded, dict):
        return "settings that cannot be read (its settings file is missing or unreadable)"
    names = sorted(set(recorded) | set(wanted))
    diffs = [
        f"another {n} ({_short(recorded.get(n))}, now {_short(wanted.get(n))})"
        for n in names
        if recorded.get(n) != wanted.get(n)
    ]
    return ", ".join(diffs)


def _short(value: Any, limit: int = 24) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
