"""Built-in text that needs no network: name it in a recipe as ``builtin:<name>``.

``builtin:python-reference`` is the language reference that CPython ships as ``pydoc_data.topics``:
about 465 KB of English prose and code in 79 documents (one per help topic).

``builtin:python-code`` is source code: about 1 MiB of the standard library's ``.py`` files, one document
per file (:mod:`distilkit.data.stdlib_corpus` says which files and why).

Every document carries ``title`` (a help topic, a file's path in the library), ``text``, and ``source``,
the corpus's name (``python-reference``, ``python-code``), which says where a row came from when corpora
are mixed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distilkit.data.stdlib_corpus import stdlib_documents
from distilkit.errors import ConfigError
from distilkit.files import write_text

BUILTIN_PREFIX = "builtin:"


def _python_reference() -> list[dict[str, str]]:
    from pydoc_data.topics import topics

    return [{"title": name, "text": text} for name, text in sorted(topics.items()) if text.strip()]


_CORPORA = {"python-reference": _python_reference, "python-code": stdlib_documents}


def builtin_documents(name: str) -> list[dict[str, str]]:
    """The documents (``{"title", "text", "source"}``) of the built-in corpus ``name`` (no prefix), in file
    order; ``source`` is ``name``."""
    if name not in _CORPORA:
        raise ConfigError(
            "data.train_files",
            f"{BUILTIN_PREFIX}{name}",
            "is not a built-in corpus",
            f"use one of {[BUILTIN_PREFIX + n for n in _CORPORA]} or a file path",
        )
    return [{**doc, "source": name} for doc in _CORPORA[name]()]


def builtin_corpus_path(name: str, cache_dir: Path) -> Path:
    """Write the built-in corpus ``name`` (no prefix) as jsonl under ``cache_dir``; return its path. The
    file is named by its content's hash, so another Python's reference text or library is never read from an
    old file."""
    text = "".join(json.dumps(doc) + "\n" for doc in builtin_documents(name))
    path = cache_dir / f"builtin-{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        write_text(path, text)
    return path
