"""Where training text comes from: local ``.txt`` / ``.jsonl`` / ``.parquet`` files, ``builtin:`` corpora
or a ``datasets`` name, checked and read into a ``datasets.Dataset`` of documents."""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from distilkit.data.corpus import BUILTIN_PREFIX, builtin_corpus_path
from distilkit.errors import ConfigError
from distilkit.files import sha256_file

#: File suffix -> ``datasets`` builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_sources(field: str, files: str | Sequence[str], cache_dir: Path) -> list[str]:
    """Check ``files`` and return them as absolute paths (a built-in corpus as the jsonl it is written to,
    a single ``datasets`` name as it is)."""
    names = [files] if isinstance(files, str) else list(files)
    if not names:
        raise ConfigError(field, files, "is empty", "give at least one file")
    sources = []
    for name in names:
        if name.startswith(BUILTIN_PREFIX):
            sources.append(str(builtin_corpus_path(name[len(BUILTIN_PREFIX) :], cache_dir)))
            continue
        path = Path(name).expanduser()
        if path.suffix in BUILDERS:
            if not path.is_file():
                raise ConfigError(field, name, "does not exist", "check the path (relative to where you run)")
            if not os.access(path, os.R_OK):
                raise ConfigError(field, name, "is not readable", "fix its permissions")
            if path.suffix != ".parquet":
                check_utf8(field, path)
            sources.append(str(path.resolve()))
        elif len(names) == 1:
            sources.append(name)  # a datasets name or directory
        else:
            raise ConfigError(
                field,
                name,
                f"has an unknown suffix {path.suffix!r}",
                f"use {sorted(BUILDERS)} files, or a single datasets name",
            )
    return sources


def load_documents(sources: list[str], field: str, text_field: str, cache_dir: Path) -> datasets.Dataset:
    """All non-empty documents of ``sources`` as a Dataset with the one column ``text_field``."""
    by_builder: dict[str, list[str]] = {}
    for source in sources:
        by_builder.setdefault(BUILDERS.get(Path(source).suffix, ""), []).append(source)
    parts = [_load(builder, files, field, cache_dir) for builder, files in by_builder.items()]
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if text_field not in docs.column_names:
        raise ConfigError(
            "data.text_field", text_field, f"is not a column of {field}", f"use one of {docs.column_names}"
        )
    docs = docs.select_columns([text_field]).filter(lambda row: bool(row[text_field]))
    if len(docs) == 0:
        raise ConfigError(field, sources, "holds no text", "give files with at least one non-empty document")
    return docs


def fingerprint(sources: Sequence[str], text_field: str) -> str:
    """Identifies what the sources hold: SHA-256 over the text field and the content of every file (a
    directory's files recursively, with their relative paths); a ``datasets`` hub name counts by name.
    Caches keyed by it are rebuilt when any file changes, appears or disappears."""
    parts: list[Any] = [text_field, [[source, content_hash(Path(source))] for source in sources]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes, of a directory's files (sorted, with relative paths), or of a name."""
    if path.is_file():
        stat = path.stat()
        return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        entries = [[str(p.relative_to(path)), content_hash(p)] for p in files]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return hashlib.sha256(str(path).encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_hash(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """Hashed once per process for a given file state (size, mtime and inode are part of the key)."""
    return sha256_file(path)


def check_utf8(field: str, path: Path, chunk_bytes: int = 2**20) -> None:
    """Refuse a text file that is not valid UTF-8, naming the byte offset (the policy: no silent
    replacement characters in training data; convert the file instead)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ConfigError(
                    field,
                    str(path),
                    f"is not valid UTF-8 ({err.reason} at byte {offset + err.start})",
                    "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
                ) from err
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ConfigError(field, str(path), "ends inside a UTF-8 character", "convert it to UTF-8") from err


def _load(builder: str, files: list[str], field: str, cache_dir: Path) -> datasets.Dataset:
    """Load files with a ``datasets`` builder (``text`` reads one document per file), or a dataset by name."""
    hf_cache = str(cache_dir / "datasets")
    try:
        if builder == "text":
            return datasets.load_dataset(
                "text", data_files=files, sample_by="document", split="train", cache_dir=hf_cache
            )
        if builder:
            return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache)
        path = Path(files[0]).expanduser()
        if path.is_dir() and (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(files[0], split="train", cache_dir=hf_cache)
    except UnicodeDecodeError as err:
        raise ConfigError(
            field,
            files,
            f"is not valid UTF-8 ({err.reason} at byte {err.start})",
            "convert the files to UTF-8",
        ) from err
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise ConfigError(
            field,
            files,
            f"could not be read ({_first_line(err)})",
            "give .txt/.jsonl/.parquet files or a datasets name that is available offline",
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
