"""The on-disk format of an offline teacher cache: its settings, records and atomic writes.

A cache directory holds::

    manifest.json                     settings, identity, each split's shards, bytes per token
    train-r0000-000000.safetensors    a shard: some blocks of one split, written by writer (rank) 0
    part-r0000.json                   a writer's record of its finished shards, until finalize merges it

Position t of a block holds the teacher's distribution of the token after token t (from its logits at
t), at the cache temperature, as top-k or sampled targets (:mod:`.codec`). A shard of n blocks of
T = ``block_size`` positions with E kept entries each (K top-k, K + S top-k with ``tail_samples`` S, S
sampled) holds the tensors ``block_index`` ``(n,)`` int64, ``ids`` ``(n, T, E)`` uint16 (V ≤ 65,536) or
uint32, ``codes`` ``(n, T, E)`` uint8, ``offset`` and ``step`` ``(n, T)`` float16, and for top-k ``tail``
``(n, T)`` float16: 3·E + 6 bytes per position at V ≤ 65,536 (198 at K = 64, or K = 32 with S = 32), plus 8
bytes per block and a header of a few hundred bytes per shard.
safetensors files map lazily, so a reader touches only the blocks it is asked for.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from distilkit.data.teacher_cache.codec import id_dtype
from distilkit.data.teacher_cache.targets import MODES
from distilkit.data.verified import HashMemo, shared_memo
from distilkit.errors import ConfigError
from distilkit.files import atomic_write

FORMAT = "distilkit-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-r(?P<rank>\d{4})-(?P<seq>\d{6})\.safetensors$")
PART_NAME = re.compile(r"^part-r(?P<rank>\d{4})\.json$")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
#: The settings every part and the manifest must agree on (``seed`` only matters for draws: sampled targets
#: and top-k ``tail_samples``, recorded only when above 0).
SETTINGS = ("format", "version", "mode", "top_k", "tail_samples", "samples", "seed", "temperature",
            "vocab_size", "block_size", "id_dtype", "num_blocks", "identity")  # fmt: skip


def cache_settings(
    mode: str,
    entries: int,
    temperature: float,
    vocab_size: int,
    block_size: int,
    num_blocks: Mapping[str, int],
    identity: Mapping[str, Any],
    seed: int = 0,
    tail_samples: int = 0,
) -> dict[str, Any]:
    """The validated settings a cache's parts and manifest record (JSON values, as read back)."""
    if mode not in MODES:
        raise ConfigError("cache.mode", mode, f"is not one of {MODES}", "use topk or sample")
    if not (isinstance(vocab_size, int) and vocab_size >= 2):
        raise ConfigError(
            "cache.vocab_size", vocab_size, "must be an integer >= 2", "pass the tokenizer's size"
        )
    if not (isinstance(entries, int) and 1 <= entries <= vocab_size):
        field = "cache.top_k" if mode == "topk" else "cache.samples"
        raise ConfigError(
            field,
            entries,
            f"must be an integer in [1, vocab_size={vocab_size}]",
            "use e.g. 64" if mode == "topk" else "use e.g. 12",
        )
    _check_tail_samples(mode, entries, tail_samples, vocab_size)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError("cache.temperature", temperature, "must be a finite number > 0", "use e.g. 1.0")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ConfigError("cache.block_size", block_size, "must be a positive integer", "use the data's")
    if not num_blocks or not all(
        isinstance(s, str) and _SPLIT_NAME.match(s) and isinstance(n, int) and n >= 0
        for s, n in num_blocks.items()
    ):
        raise ConfigError(
            "cache.num_blocks", dict(num_blocks), "must map split names to block counts", "e.g. {train: 845}"
        )
    try:
        identity = json.loads(json.dumps(dict(identity)))
    except (TypeError, ValueError) as err:
        raise ConfigError("cache.identity", identity, f"is not JSON ({err})", "pass strings") from err
    settings: dict[str, Any] = {"format": FORMAT, "version": VERSION, "mode": mode}
    settings["top_k" if mode == "topk" else "samples"] = entries
    if tail_samples:
        settings["tail_samples"] = tail_samples
    if mode == "sample" or tail_samples:
        settings["seed"] = int(seed)
    settings.update(
        temperature=float(temperature),
        vocab_size=vocab_size,
        block_size=block_size,
        id_dtype=id_dtype(vocab_size).name,
        num_blocks=dict(num_blocks),
        identity=identity,
    )
    return settings


def _check_tail_samples(mode: str, top_k: int, tail_samples: int, vocab_size: int) -> None:
    """Tail draws: an integer ≥ 0, only in top-k mode, and only where there is a tail (K < V)."""
    if not (isinstance(tail_samples, int) and not isinstance(tail_samples, bool) and tail_samples >= 0):
        raise ConfigError("cache.tail_samples", tail_samples, "must be an integer >= 0", "use e.g. 32, or 0")
    if tail_samples and mode != "topk":
        raise ConfigError(
            "cache.tail_samples", tail_samples, "applies to --mode topk only", "drop it, or use --mode topk"
        )
    if tail_samples and top_k >= vocab_size:
        raise ConfigError(
            "cache.tail_samples", tail_samples, f"needs a tail: top_k={top_k} keeps the whole vocabulary",
            "lower --top_k, or set --tail_samples 0",
        )  # fmt: skip


def stored_entries(settings: Mapping[str, Any]) -> int:
    """E, the entries stored per position: K (+ S tail draws) in top-k, S sampled."""
    if settings["mode"] == "topk":
        return int(settings["top_k"]) + int(settings.get("tail_samples", 0))
    return int(settings["samples"])


def compare_settings(found: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Refuse to add to a cache made with other settings: a ConfigError naming the first that differs."""
    for key in SETTINGS:
        if found.get(key) != wanted.get(key):
            raise ConfigError(
                f"cache.{key}",
                wanted.get(key),
                f"differs from {found.get(key)!r} in {where}",
                "write to another directory, or use the settings that cache was made with",
            )


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`distilkit.files.atomic_write` (never half a file)."""
    with atomic_write(path, "wb") as file:
        file.write(data)


def part_name(rank: int) -> str:
    return f"part-r{rank:04d}.json"


def load_json(path: Path, field: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            field, str(path), f"is not a readable cache record ({first_line(err)})", "remake the cache"
        ) from err
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise ConfigError(field, str(path), f"is not a {FORMAT} record", "point to a teacher cache directory")
    if value.get("version") != VERSION:
        raise ConfigError(
            field, str(path), f"has format version {value.get('version')!r}, this distilkit reads {VERSION}",
            "remake the cache with this version of distilkit",
        )  # fmt: skip
    return value


def read_records(directory: Path, field: str) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The manifest (or None) and every writer's part, by file name."""
    manifest_path = directory / MANIFEST
    manifest = load_json(manifest_path, field) if manifest_path.is_file() else None
    parts = {p.name: load_json(p, field) for p in sorted(directory.iterdir()) if PART_NAME.match(p.name)}
    return manifest, parts


def all_shards(
    manifest: Mapping[str, Any] | None, parts: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every shard record of the manifest and the parts, once each (by file name)."""
    records: dict[str, dict[str, Any]] = {}
    if manifest is not None:
        for info in manifest["splits"].values():
            records.update((r["file"], r) for r in info["shards"])
    for part in parts.values():
        records.update((r["file"], r) for r in part["shards"])
    return [records[name] for name in sorted(records)]


def valid_shards(
    directory: Path, records: Iterable[dict[str, Any]], memo: HashMemo | None = None, warn: bool = True
) -> list[dict[str, Any]]:
    """The records whose file is on disk with the recorded size and SHA-256 (hashes remembered in ``memo``,
    default :func:`~distilkit.data.verified.shared_memo`: a shard unchanged since it was hashed costs a
    ``stat``); warns (``warn``) about the others, whose blocks a writer computes again."""
    memo = memo if memo is not None else shared_memo()
    valid = []
    for record in records:
        problem = shard_problem(directory / record["file"], record, memo, save=False)
        if problem is None:
            valid.append(record)
        elif warn:
            warnings.warn(
                f"teacher cache: shard {directory / record['file']} {problem}; "
                "its blocks will be written again",
                stacklevel=3,
            )
    memo.save()
    return valid


def shard_problem(path: Path, record: Mapping[str, Any], memo: HashMemo, save: bool = True) -> str | None:
    """What is wrong with a shard file against its record (missing, another size, other bytes), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"has {size} bytes, the manifest says {record['bytes']} (truncated?)"
    if memo.sha256(path, save=save) != record["sha256"]:
        return "has other bytes than were written (its SHA-256 differs from the manifest's)"
    return None


def read_block_index(path: Path) -> np.ndarray:
    with safe_open(str(path), framework="np") as handle:
        return handle.get_tensor("block_index").astype(np.int64)


def read_manifest(directory: Path, field: str) -> dict[str, Any]:
    """The manifest of a finished cache, with the fields a reader needs checked."""
    path = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise ConfigError(field, str(directory), "is a file, not a cache directory", "give a cache directory")
    if not path.is_file():
        hint = "the cache run did not finish" if any(directory.glob("part-r*.json")) else "no cache here"
        raise ConfigError(field, str(directory), f"has no {MANIFEST} ({hint})", "run `distilkit cache` first")
    manifest = load_json(path, field)
    try:
        settings = {key: manifest[key] for key in SETTINGS if key in manifest}
        cache_settings(
            settings["mode"],
            settings["top_k" if settings["mode"] == "topk" else "samples"],
            settings["temperature"],
            settings["vocab_size"],
            settings["block_size"],
            settings["num_blocks"],
            settings["identity"],
            settings.get("seed", 0),
            settings.get("tail_samples", 0),
        )
        for split in manifest["num_blocks"]:
            for record in manifest["splits"][split]["shards"]:
                for key in ("file", "blocks", "first_block", "last_block", "bytes", "sha256"):
                    record[key]  # noqa: B018 (presence check)
    except (KeyError, TypeError, ConfigError) as err:
        raise ConfigError(
            field, str(path), f"is incomplete or damaged ({first_line(err)})", "remake the cache"
        ) from err
    return manifest


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
