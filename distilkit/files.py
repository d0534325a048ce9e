"""Writing files so that a crash never leaves half of one: every writer in distilkit goes through here.

A file is written to a temporary name beside its target (``.<name>.<random>.tmp``: same file system, so the
rename is atomic), flushed and fsynced, given the permissions a plain ``open`` would give (``0o666`` less
the umask: ``mkstemp`` makes ``0o600``), then renamed over the target. A directory is staged the same way
and renamed into place whole. Readers see the old file or the new one, never a mixture.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from distilkit.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    Args:
        path: the target file; its directory is created if needed.
        mode: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``.
        **open_kwargs: passed to ``open`` (``newline``, ``encoding``).

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path) as file:
        file.write(text)


@contextmanager
def atomic_directory(
    path: str | os.PathLike[str], *, overwrite: bool = False, field: str = "output_dir"
) -> Iterator[Path]:
    """Stage a directory beside ``path``; on a clean exit it becomes ``path``.

    An existing non-empty ``path`` is refused (a :class:`ConfigError` naming ``field``) unless
    ``overwrite``, checked before anything is written. On an exception the staging directory is removed.
    """
    target = Path(path)
    refuse_existing(target, overwrite=overwrite, field=field)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        _normal_permissions(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _normal_permissions(directory: Path) -> None:
    """What ``mkdir``/``open`` would give under the umask, for the directory and all it holds (staging
    directories start at 0o700, and writers such as safetensors leave their files at 0o600)."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def refuse_existing(path: Path, *, overwrite: bool, field: str) -> None:
    """Refuse to write a directory over an existing non-empty one unless ``overwrite``, and over anything that
    is not a directory (a file given as an output directory) at all."""
    if path.exists() and not path.is_dir():
        raise ConfigError(
            field, str(path), "is a file, not a directory", "give a directory path (it is created)"
        )
    exists = path.is_dir() and any(path.iterdir())
    if exists and not overwrite:
        raise ConfigError(field, str(path), "already exists", "choose a new path or pass --overwrite true")


def check_writable(path: str | os.PathLike[str], field: str) -> None:
    """Refuse an output path whose directory cannot be created or written, before any work is done."""
    parent = Path(path).expanduser().absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            field,
            str(path),
            f"cannot be written ({existing} is not a writable directory)",
            "choose a path in a directory you can write to",
        )


def check_output_file(path: str | os.PathLike[str], field: str) -> None:
    """Refuse an output file path that is a directory, or whose directory cannot be written (before any
    work is done)."""
    if Path(path).is_dir():
        raise ConfigError(field, str(path), "is a directory", "give a file path")
    check_writable(path, field)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 2**20) -> str:
    """The SHA-256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
