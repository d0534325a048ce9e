"""Where training text comes from: local ``.txt`` / ``.jsonl`` / ``.parquet`` files, ``builtin:`` corpora
or a ``datasets`` name, checked and read into a ``datasets.Dataset`` of documents."""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from distilkit.data.corpus import BUILTIN_PREFIX, builtin_corpus_path
from distilkit.data.progress import LONG_DOCUMENTS, LONG_TEXT_BYTES, bars_if
from distilkit.errors import ConfigError
from distilkit.files import sha256_file

#: File suffix -> ``datasets`` builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

#: ``data.domains`` / ``model.route_by``: a document's domain is the data file it came from.
FILE_DOMAIN = "file"


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
            if path.suffix != ".parquet" and not check_utf8(field, path):
                raise ConfigError(field, name, "holds no text (it is empty or blank)", "give it text")
            sources.append(str(path.resolve()))
        elif path.suffix and not path.is_dir():
            raise ConfigError(
                field,
                name,
                f"has an unsupported suffix {path.suffix!r}",
                f"convert it to one of {sorted(BUILDERS)}, or give a datasets name or directory",
            )
        elif len(names) == 1:
            sources.append(name)  # a datasets name or directory
        else:
            raise ConfigError(field, name, "is a datasets name among files", "give it alone, or only files")
    return sources


def load_documents(
    sources: list[str],
    field: str,
    text_field: str,
    cache_dir: Path,
    skip_missing_text: bool = False,
    also: str | None = None,
) -> datasets.Dataset:
    """All non-empty documents of ``sources`` as a Dataset with the one column ``text_field`` (and ``also``).

    A row whose ``text_field`` is not text (a number, a list ...) is refused naming its file and line; rows
    without it (missing or null) are counted and refused unless ``skip_missing_text``, then skipped with a
    warning. Empty strings are empty documents and are dropped. ``also``: a second column kept beside the
    text, as strings (numbers are written out; None where a row or a file has no such field).
    """
    columns = [text_field] if also is None or also == text_field else [text_field, also]
    groups = _by_builder(sources)
    with bars_if(_text_bytes(sources) >= LONG_TEXT_BYTES):  # progress only where loading takes a while
        parts = [
            _columns(_load(builder, files, field, cache_dir), columns, files)
            for builder, files in groups.items()
        ]
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if text_field not in docs.column_names:
        raise ConfigError(
            "data.text_field", text_field, f"is not a column of {field}", f"use one of {docs.column_names}"
        )
    _check_text_column(docs, sources, field, text_field, skip_missing_text)
    with bars_if(docs.num_rows >= LONG_DOCUMENTS):
        docs = docs.select_columns(columns).filter(lambda row: bool(row[text_field]))
    if len(docs) == 0:
        raise ConfigError(field, sources, "holds no text", "give files with at least one non-empty document")
    return docs


def document_domains(
    sources: list[str],
    field: str,
    text_field: str,
    domains: str,
    cache_dir: Path,
    skip_missing_text: bool = False,
    names: dict[str, str] | None = None,
) -> list[str | None]:
    """The domain of every document :func:`load_documents` gives for ``sources``, in its order.

    Args:
        sources: resolved sources (:func:`resolve_sources`).
        field: the config field they came from, named in errors.
        text_field: the text column.
        domains: a row field, whose value (as text; None where a row has none) is the document's domain, or
            :data:`FILE_DOMAIN`: the data file a document came from, by its name in ``names``.
        cache_dir: distilkit's cache directory.
        skip_missing_text: as :func:`load_documents`.
        names: ``{source: name}`` for :data:`FILE_DOMAIN` (default: each file's stem).
    """
    if domains != FILE_DOMAIN:
        docs = load_documents(sources, field, text_field, cache_dir, skip_missing_text, also=domains)
        return list(docs[domains])
    values: list[str | None] = []
    for files in _by_builder(sources).values():  # load_documents' order: by builder, then as given
        for source in files:
            count = len(load_documents([source], field, text_field, cache_dir, skip_missing_text))
            values += [(names or {}).get(source, Path(source).stem)] * count
    return values


def source_name(name: str) -> str:
    """What a data file is called as a domain: a built-in corpus by its name (``python-code``), a file by
    its stem (``data/code.jsonl`` -> ``code``), a ``datasets`` name as it is."""
    if name.startswith(BUILTIN_PREFIX):
        return name[len(BUILTIN_PREFIX) :]
    path = Path(name)
    return path.stem if path.suffix in BUILDERS else name


def row_naming(
    sources: list[str], domains: str, value: str | None, names: dict[str, str] | None = None
) -> str:
    """Where the first row whose domain is ``value`` is, for an error message to name it: ``file:line``
    (jsonl), or the file (a :data:`FILE_DOMAIN`, named as in ``names``; a file of another format)."""
    if domains == FILE_DOMAIN:
        named = (s for s in sources if (names or {}).get(s, Path(s).stem) == value)
        return next(named, str(sources))
    found = lambda v: (None if v is None else str(v)) == value  # noqa: E731
    where, _ = _first_row(sources, domains, found)
    others = [s for s in sources if Path(s).suffix not in (".jsonl", ".json")]
    return where or (f"a row of {others}" if others else str(sources))


def _text_bytes(sources: Sequence[str]) -> float:
    """Bytes of the local files among ``sources`` (a ``datasets`` name counts as large: size unknown)."""
    total = 0.0
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        else:
            total = float("inf")
    return total


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
        return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        entries = [[str(p.relative_to(path)), content_hash(p)] for p in files]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return hashlib.sha256(str(path).encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_hash(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """Hashed once per process for a given file state: any write changes ``ctime`` (which, unlike the
    modification time, cannot be set back), so a rewritten file is always hashed again."""
    return sha256_file(path)


def check_utf8(field: str, path: Path, chunk_bytes: int = 2**20) -> bool:
    """Refuse a text file that is not valid UTF-8, naming the byte offset (the policy: no silent
    replacement characters in training data; convert the file instead). Returns whether it holds anything
    but white space."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            has_text = has_text or bool(chunk.strip())
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
    return has_text


def _check_text_column(
    docs: datasets.Dataset, sources: list[str], field: str, text_field: str, skip_missing: bool
) -> None:
    """Refuse a text column that holds something other than text, and rows without text (unless asked to
    skip them); the first offending row is named by file and line where the source is jsonl."""
    feature = docs.features[text_field]
    is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not is_text:
        where, value = _first_row(sources, text_field, lambda v: v is not None and not isinstance(v, str))
        raise ConfigError(
            field,
            where or sources,
            f"has {type(value).__name__ if where else feature} values in {text_field!r}, not text",
            f"make every {text_field!r} a string (or choose data.text_field)",
        )
    missing = docs.with_format("arrow")[text_field].null_count
    if not missing:
        return
    where, _ = _first_row(sources, text_field, lambda v: v is None)
    if not skip_missing:
        raise ConfigError(
            field,
            f"{missing} rows",
            f"have no {text_field!r}" + (f" (the first at {where})" if where else ""),
            "fix those rows, or set data.skip_missing_text: true to train without them",
        )
    message = f"{field}: skipped {missing} rows without {text_field!r} (data.skip_missing_text)"
    warnings.warn(message, stacklevel=2)


def _first_row(sources: list[str], text_field: str, bad: Any) -> tuple[str | None, Any]:
    """``("file:line", value)`` of the first jsonl row whose ``text_field`` value ``bad(value)`` is true
    (a missing field counts as None); ``(None, None)`` when no jsonl source has one."""
    for source in sources:
        if Path(source).suffix not in (".jsonl", ".json"):
            continue
        with open(source, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                value = row.get(text_field) if isinstance(row, dict) else None
                if bad(value):
                    return f"{source}:{number}", value
    return None, None


def _by_builder(sources: list[str]) -> dict[str, list[str]]:
    """The sources by the ``datasets`` builder that reads them, builders in order of first appearance."""
    by_builder: dict[str, list[str]] = {}
    for source in sources:
        by_builder.setdefault(BUILDERS.get(Path(source).suffix, ""), []).append(source)
    return by_builder


def _columns(part: datasets.Dataset, columns: list[str], files: list[str]) -> datasets.Dataset:
    """``part`` with only ``columns``: the text (refused later when missing) and a domain field, as strings,
    added as None where the files have no such field."""
    if columns[0] not in part.column_names:
        return part
    for name in columns[1:]:
        if name not in part.column_names:
            part = part.add_column(name, [None] * len(part))
        feature = part.features[name]
        if not isinstance(feature, datasets.Value):
            raise ConfigError(
                "data.domains",
                name,
                f"holds {feature} values in {files}, not a name",
                "name each row's domain with a string or a number",
            )
        if feature.dtype not in ("string", "large_string"):
            part = part.cast_column(name, datasets.Value("string"))
    return part.select_columns(columns)


def _load(builder: str, files: list[str], field: str, cache_dir: Path) -> datasets.Dataset:
    """Load files with a ``datasets`` builder (``text`` reads one document per file), or a dataset by name.
    Its cache is keyed by the files' content (``datasets`` keys local files by path and time alone)."""
    hf_cache = str(cache_dir / "datasets" / fingerprint(files, builder)[:16])
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
