"""Token-id caches that are checked when read back: ``tokens-<key>.arrow`` with a checksum beside it.

A cache file is written once (by ``datasets.Dataset.map``) and its SHA-256 is recorded beside it in
``tokens-<key>.json``, with the file's state (size, modification and change times, inode) when it was last
checked. Reading it back compares that state first: unchanged, the file is trusted without being read
(any write through the file system changes the change time, which cannot be set back); changed, the file
is hashed again, and a matching hash is remembered under the new state. A file whose bytes differ from
the record, or that has no record (written by an older distilkit, or by a run killed before recording), is
deleted and rebuilt with a one-line warning: a token cache is derived data, keyed by the content of what it
was made from, so a rebuild always gives the right ids and nobody has to repair anything by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from lightning.pytorch.utilities import rank_zero_warn

from distilkit.data.progress import LONG_DOCUMENTS, bars_if
from distilkit.files import sha256_file, write_text


def record_path(cache_file: Path) -> Path:
    """Where the checksum of ``cache_file`` is kept: ``tokens-<key>.json`` beside ``tokens-<key>.arrow``."""
    return cache_file.with_suffix(".json")


def cached_map(
    docs: datasets.Dataset,
    function: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    cache_file: Path,
    key: str,
    remove_columns: list[str],
    desc: str = "tokenizing",
    features: datasets.Features | None = None,
) -> datasets.Dataset:
    """``docs.map(function, batched=True)`` cached in ``cache_file``, checked before it is reused.

    Args:
        docs: the rows to map.
        function: a batched ``datasets`` map function.
        cache_file: the ``.arrow`` file to write, or to reuse when it passes :func:`check`.
        key: the cache's content key (``datasets``' fingerprint of the result).
        remove_columns: input columns the result leaves out.
        desc: the progress bar's label.
        features: the result's column types (default: inferred).
    """
    check(cache_file)
    with bars_if(docs.num_rows >= LONG_DOCUMENTS):
        mapped = docs.map(
            function,
            batched=True,
            remove_columns=remove_columns,
            cache_file_name=str(cache_file),
            new_fingerprint=key,
            desc=desc,
            features=features,
        )
    if not record_path(cache_file).exists():
        _record(cache_file, sha256_file(cache_file))
    return mapped


def check(cache_file: Path) -> bool:
    """Whether ``cache_file`` may be reused: it exists and its bytes are the ones recorded when it was
    written. A file that fails is deleted (with its record) and reported in one line, so the caller
    rebuilds it."""
    if not cache_file.exists():
        record_path(cache_file).unlink(missing_ok=True)
        return False
    record = _read_record(cache_file)
    state = _state(cache_file)
    if record is not None and record.get("state") == state:
        return True  # checked before in this state: no write has touched it since
    actual = sha256_file(cache_file)
    if record is not None and record.get("sha256") == actual:
        _record(cache_file, actual)  # remember the check under the file's new state
        return True
    problem = (
        "has no recorded checksum (written before checksums were kept, or interrupted)"
        if record is None
        else f"differs from the checksum recorded when it was written (sha256 {actual[:12]}... "
        f"instead of {str(record.get('sha256'))[:12]}...)"
    )
    rank_zero_warn(f"token cache {cache_file} {problem}: rebuilding it")
    cache_file.unlink(missing_ok=True)
    record_path(cache_file).unlink(missing_ok=True)
    return False


def _read_record(cache_file: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(record_path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _record(cache_file: Path, sha256: str) -> None:
    record = {"file": cache_file.name, "sha256": sha256, "state": _state(cache_file)}
    write_text(record_path(cache_file), json.dumps(record) + "\n")


def _state(path: Path) -> list[int]:
    """What changes whenever the file is written: size, modification and change times (ns), inode."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
