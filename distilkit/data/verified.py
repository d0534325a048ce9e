"""Directories distilkit writes once and reads back many times, verified by content at a cost that fits.

A verified directory carries ``distilkit-manifest.json``: the SHA-256 and size of every file it was written
with, hashed from the bytes on disk once they were written. Reading it back checks, for every file, that
it is there with its size (a truncated file fails at once) and that its content hash matches; a file it was
not written with is refused too (``from_pretrained`` would read an extra weights file).

Hashing gigabytes on every load would cost seconds per gigabyte, so each hash is *remembered* with the
file's stat stamp (size, mtime, ctime, inode, device; :class:`HashMemo`): a file whose stamp is unchanged
since its hash was taken is not read again. Writing a file changes its mtime and its ctime (which no user
call can set back), so an edited or truncated file is hashed again and caught; an untouched one costs a
``stat``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilkit.errors import ConfigError
from distilkit.files import sha256_file, write_text

MANIFEST = "distilkit-manifest.json"

#: ``(size, mtime_ns, ctime_ns, inode, device)``: what changes when a file's content does.
Stamp = tuple[int, int, int, int, int]


def stamp(path: Path) -> Stamp:
    """The stat stamp of ``path`` (see the module docstring)."""
    info = path.stat()
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


class HashMemo:
    """SHA-256 digests of files, remembered by their stat stamp in one JSON file.

    ``{absolute path: [size, mtime_ns, ctime_ns, inode, device, sha256]}``, rewritten atomically on each
    new entry. Processes that write it at once may drop each other's entries: a dropped entry only costs
    hashing that file again.

    Args:
        file: where the memo is kept (created on first use).
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self.entries: dict[str, list[Any]] = {}
        self.reload()

    def reload(self) -> None:
        """Read the memo again (another process may have remembered files since)."""
        try:
            self.entries = dict(json.loads(self.file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            self.entries = {}

    def sha256(self, path: Path, on_hash: Callable[[Path], None] | None = None, *, save: bool = True) -> str:
        """The file's digest: remembered when its stamp is unchanged, else hashed now and remembered.

        ``on_hash(path)`` is called before a file is read whole (to show progress). ``save=False`` keeps a
        new entry in memory only (:meth:`save` writes them all at once: many files, one write).
        """
        remembered = self.lookup(path)
        if remembered is not None:
            return remembered
        if on_hash is not None:
            on_hash(path)
        digest = sha256_file(path)
        self.remember(path, digest, save=save)
        return digest

    def lookup(self, path: Path) -> str | None:
        """The digest remembered for ``path`` as it is now (its stamp unchanged), or None."""
        entry = self.entries.get(str(path.resolve()))
        return str(entry[-1]) if entry is not None and tuple(entry[:-1]) == stamp(path) else None

    def remember(self, path: Path, digest: str, *, save: bool = True) -> None:
        """Record that ``path``, as it is now, hashes to ``digest`` (``save=False``: in memory only)."""
        self.entries[str(path.resolve())] = [*stamp(path), digest]
        if save:
            self.save()

    def save(self) -> None:
        """Write the memo (entries of files that no longer exist are dropped). A memo that cannot be written
        (a read-only cache directory) only costs hashing again next time."""
        self.entries = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        with contextlib.suppress(OSError):
            write_text(self.file, json.dumps(self.entries, indent=0, sort_keys=True) + "\n")


def as_command(name: str, **options: Any) -> str:
    """``distilkit NAME --option value ...`` for the options that are not None, quoted for a shell: the
    command a manifest records, which writes the directory again."""
    words = ["distilkit", name]
    for option, value in options.items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            words += [f"--{option}", text]
    return shlex.join(words)


def cache_root() -> Path:
    """``$DISTILKIT_CACHE``, else ``~/.cache/distilkit``: where distilkit keeps what it derives."""
    return Path(os.environ.get("DISTILKIT_CACHE", Path.home() / ".cache" / "distilkit")).expanduser()


def content_sha256(path: Path, memo: HashMemo | None = None) -> str:
    """SHA-256 of a file's content, or of a directory's (every file's relative path and hash, in order),
    with each file's hash remembered in ``memo`` (default :func:`shared_memo`): what identifies a model or a
    data file whatever its path."""
    memo = memo if memo is not None else shared_memo()
    if path.is_file():
        return memo.sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    entries = [[p.relative_to(path).as_posix(), memo.sha256(p, save=False)] for p in files]
    memo.save()
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def shared_memo() -> HashMemo:
    """The memo of the hashes of files distilkit wrote and reads back (teacher-cache shards, checkpoints,
    exported models, trained tokenizers): ``$DISTILKIT_CACHE/hashes.json``."""
    return HashMemo(cache_root() / "hashes.json")


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, **fields: Any) -> dict[str, Any]:
    """Hash every file under ``directory`` and write its manifest (``fields`` stored beside the hashes).

    Returns:
        The manifest: ``{"files": {relative path: {"bytes": n, "sha256": hex}}, **fields}``.
    """
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(directory)
    }
    manifest = {**fields, "files": files}
    write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def remember_manifest(directory: Path, manifest: dict[str, Any], memo: HashMemo) -> None:
    """Remember the manifest's hashes for the files as they now lie (after the directory was moved into
    place), so that the first read does not hash them again."""
    for name, entry in manifest["files"].items():
        memo.remember(directory / name, entry["sha256"])


def verify_directory(
    directory: Path,
    memo: HashMemo,
    *,
    field: str,
    value: str,
    fix: str,
    on_hash: Callable[[Path], None] | None = None,
    what: str = "its converted copy",
    extra_files: bool = False,
) -> dict[str, Any]:
    """Check ``directory`` against its manifest; the first difference is a one-line :class:`ConfigError`.

    Args:
        directory: a directory written with :func:`write_manifest`.
        memo: remembered hashes (:class:`HashMemo`).
        field / value: what the error names (``model.teacher``, the file the directory was made from).
        fix: the command that repairs it.
        on_hash: called before a file is hashed whole.
        what: the directory as the message names it (``its converted copy``, ``its trained tokenizer``).
        extra_files: accept files the directory was not written with (a README added to an export).

    Returns:
        The manifest.
    """

    def refuse(problem: str) -> ConfigError:
        return ConfigError(field, value, problem, fix)

    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        expected: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise refuse(f"{what} {directory} has no readable {MANIFEST} ({type(err).__name__})") from err
    for name, entry in expected.items():
        path = directory / name
        if not path.is_file():
            raise refuse(f"{what}'s {path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise refuse(f"{what}'s {path} is {size} bytes, not the {entry['bytes']} written")
        if memo.sha256(path, on_hash) != entry["sha256"]:
            raise refuse(f"{what}'s {path} does not match the SHA-256 written with it")
    extra = [p for p in _files(directory) if p.relative_to(directory).as_posix() not in expected]
    if extra and not extra_files:
        raise refuse(f"{what} holds {extra[0]}, which it was not written with")
    return dict(manifest)
