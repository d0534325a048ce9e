"""Writing an offline teacher cache: one process's share, shard by shard, resumable.

Each shard is written to a temporary file beside it, flushed to disk and renamed, and only then
recorded in its writer's ``part-r<rank>.json`` (also replaced atomically): after a kill, every recorded
shard is whole, and a new writer on the directory skips the blocks they hold (:meth:`CacheWriter.done`).
Several writers (one per process, each with its own ``rank``) write disjoint or overlapping blocks into
their own shards; :func:`finalize_cache` (one process, after all have closed) merges the parts into
``manifest.json``. Sampled targets draw from a generator seeded by (seed, split, block), so the cache
does not depend on how blocks were spread over processes, nor on where a run was interrupted. The
format is described in :mod:`distilkit.data.teacher_cache.format`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_safetensors
from torch import Tensor

from distilkit.data.teacher_cache.codec import (
    EncodedTargets,
    block_uniforms,
    bytes_per_position,
    encode,
    sample_targets,
    topk_targets,
)
from distilkit.data.teacher_cache.format import (
    FORMAT,
    MANIFEST,
    PART_NAME,
    SETTINGS,
    SHARD_NAME,
    VERSION,
    all_shards,
    cache_settings,
    compare_settings,
    part_name,
    read_block_index,
    read_records,
    stored_entries,
    valid_shards,
    write_atomic,
)
from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.data.verified import shared_memo
from distilkit.errors import ConfigError

#: Bytes of targets per shard when ``shard_blocks`` is not given.
SHARD_BYTES = 128 * 2**20


class CacheWriter:
    """Writes one process's share of a teacher cache, shard by shard, resuming what is already on disk.

    Args:
        directory: the cache directory (created if missing). An existing cache there must have been
            made with the same settings and identity.
        mode: ``"topk"`` (the K most likely ids, their log-probabilities and the tail mass) or
            ``"sample"`` (S ids drawn from the teacher's distribution, with their log-probabilities).
        entries: K (top-k) or S (sample), at most ``vocab_size``.
        temperature: τ > 0; targets describe softmax(teacher logits / τ). A student trains from the cache
            with a loss at this temperature.
        vocab_size: V, the number of logits per position (the tokenizer's size).
        block_size: T, positions per block.
        num_blocks: the number of blocks of each split of the data, e.g. ``{"train": 845, "val": 33}``.
        identity: what the cache was made from, compared by :meth:`TeacherCache.check`: e.g. the
            teacher's name and config hash, the tokenizer's hash, the data fingerprint (JSON values).
        seed: seeds the draws of sampled targets and tail draws (with the split and block index).
        rank: this writer's number when several processes write (names its shards and its part).
        shard_blocks: blocks per shard (default: about :data:`SHARD_BYTES` of targets).
        tail_samples: S, ids drawn from the tail (outside the top K) after the top K, in top-k mode (default
            0: none; needs K < V).
        command: the command that writes the cache (recorded: a damaged shard's message names it, since
            running it again rewrites exactly the blocks that are missing or damaged).
    """

    def __init__(
        self,
        directory: str | Path,
        mode: str,
        entries: int,
        temperature: float,
        vocab_size: int,
        block_size: int,
        num_blocks: Mapping[str, int],
        identity: Mapping[str, Any],
        seed: int = 0,
        rank: int = 0,
        shard_blocks: int | None = None,
        tail_samples: int = 0,
        command: str | None = None,
    ) -> None:
        self.command = command
        self.memo = shared_memo()
        self.settings = cache_settings(
            mode, entries, temperature, vocab_size, block_size, num_blocks, identity, seed, tail_samples
        )
        if not (isinstance(rank, int) and 0 <= rank < 10_000):
            raise ConfigError("cache.rank", rank, "must be an integer in [0, 9999]", "use the process rank")
        per_block = block_size * bytes_per_position(mode, stored_entries(self.settings), vocab_size)
        self.shard_blocks = shard_blocks or max(1, SHARD_BYTES // per_block)
        if not (isinstance(self.shard_blocks, int) and self.shard_blocks >= 1):
            raise ConfigError(
                "cache.shard_blocks", shard_blocks, "must be a positive integer", "use e.g. 1024"
            )
        self.directory, self.rank = Path(directory), rank
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".*-r{rank:04d}*.tmp"):  # an interrupted write of this rank
            stale.unlink()
        manifest, parts = read_records(self.directory, "cache.output_dir")
        for source, settings in [(MANIFEST, manifest), *((name, part) for name, part in parts.items())]:
            if settings is not None:
                compare_settings(settings, self.settings, f"{self.directory / source}")
        recorded = valid_shards(self.directory, all_shards(manifest, parts), self.memo)
        own = parts.get(part_name(rank))
        valid = {record["file"] for record in recorded}
        self._records = [r for r in own["shards"] if r["file"] in valid] if own else []
        self._done: dict[str, set[int]] = {split: set() for split in self.settings["num_blocks"]}
        for record in recorded:
            self._done[record["split"]].update(read_block_index(self.directory / record["file"]).tolist())
        self._next_seq = {split: _next_seq(self.directory, split, rank) for split in self._done}
        self._pending: dict[str, list[tuple[int, EncodedTargets]]] = {split: [] for split in self._done}

    @property
    def mode(self) -> str:
        return str(self.settings["mode"])

    @property
    def entries(self) -> int:
        return int(self.settings["top_k" if self.mode == "topk" else "samples"])

    @property
    def tail_samples(self) -> int:
        return int(self.settings.get("tail_samples", 0))

    def done(self, split: str) -> set[int]:
        """The blocks of ``split`` already on disk (in shards of any writer); :meth:`write` skips them."""
        return set(self._done[self._split(split)])

    def missing(self, split: str) -> list[int]:
        """The blocks of ``split`` neither on disk nor waiting in this writer's buffer, in order."""
        waiting = {block for block, _ in self._pending[self._split(split)]}
        skip = self._done[split] | waiting
        return [b for b in range(self.settings["num_blocks"][split]) if b not in skip]

    def write(self, split: str, block_indices: Tensor | Sequence[int], teacher_logits: Tensor) -> int:
        """Encode the teacher's targets for some blocks and buffer them; full shards go to disk.

        Args:
            split: a split named in ``num_blocks``.
            block_indices: ``(B,)`` the blocks' indices in the split (as the data module numbers them).
            teacher_logits: ``(B, T, V)`` the teacher's logits on those blocks (any float dtype, any device).

        Returns:
            How many blocks were new (blocks already on disk or in the buffer are skipped: a resumed run,
            or a sampler that repeats blocks to even out processes).
        """
        split = self._split(split)
        blocks = [int(b) for b in torch.as_tensor(block_indices).reshape(-1).tolist()]
        expected = (len(blocks), self.settings["block_size"], self.settings["vocab_size"])
        if tuple(teacher_logits.shape) != expected:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} should be (B, T, V) = {expected}")
        return self._add(
            split, blocks, lambda row, block: self._encode_block(split, block, teacher_logits[row])
        )

    def write_targets(self, split: str, block_indices: Tensor | Sequence[int], targets: SparseTargets) -> int:
        """Buffer top-k targets made elsewhere (a teacher's server), as :meth:`write` buffers its own.

        Args:
            split: a split named in ``num_blocks``.
            block_indices: ``(B,)`` the blocks' indices in the split.
            targets: ``SparseTargets("topk")`` of those blocks: ids/log_probs ``(B, T, K)`` (log p descending,
                at the cache's temperature), tail ``(B, T)``; K is the cache's ``top_k``.

        Returns:
            How many blocks were new (as :meth:`write`).
        """
        split = self._split(split)
        blocks = [int(b) for b in torch.as_tensor(block_indices).reshape(-1).tolist()]
        expected = (len(blocks), self.settings["block_size"], self.entries)
        if self.mode != "topk" or targets.mode != "topk" or tuple(targets.ids.shape) != expected:
            raise ValueError(
                f"{targets.mode} targets {tuple(targets.ids.shape)} should be topk (B, T, K) = {expected} "
                f"for a {self.mode} cache"
            )
        tail = targets.tail
        assert tail is not None
        vocab = int(self.settings["vocab_size"])
        return self._add(
            split, blocks, lambda row, _: encode(targets.ids[row], targets.log_probs[row], tail[row], vocab)
        )

    def _add(self, split: str, blocks: list[int], encoded: Callable[[int, int], EncodedTargets]) -> int:
        """Buffer ``encoded(row, block)`` for each new block (full shards go to disk); how many were new."""
        count = self.settings["num_blocks"][split]
        waiting = {block for block, _ in self._pending[split]}
        new = 0
        for row, block in enumerate(blocks):
            if not 0 <= block < count:
                raise ValueError(f"block {block} is outside the {count} blocks of split {split!r}")
            if block in self._done[split] or block in waiting:
                continue
            self._pending[split].append((block, encoded(row, block)))
            waiting.add(block)
            new += 1
            if len(self._pending[split]) >= self.shard_blocks:
                self._flush(split)
                waiting.clear()
        return new

    def close(self) -> None:
        """Write every buffered block (a last, shorter shard per split). The writer stays usable."""
        for split in self._pending:
            if self._pending[split]:
                self._flush(split)

    def finalize(self) -> dict[str, Any]:
        """Close, then merge every writer's part into ``manifest.json`` (see :func:`finalize_cache`).

        With several processes, call it on one of them after all have closed."""
        self.close()
        return finalize_cache(self.directory)

    # -------------------------------------------------------------------------------------------- helpers
    def _split(self, split: str) -> str:
        if split not in self._done:
            raise ValueError(f"split {split!r} is not one of {sorted(self._done)}")
        return split

    def _encode_block(self, split: str, block: int, logits: Tensor) -> EncodedTargets:
        """The compact targets of one block from its ``(T, V)`` logits."""
        temperature, vocab = float(self.settings["temperature"]), int(self.settings["vocab_size"])
        draws = self.tail_samples if self.mode == "topk" else self.entries
        uniforms = None
        if draws:
            uniforms = block_uniforms(int(self.settings["seed"]), split, block, logits.shape[0], draws)
        if self.mode == "topk":
            ids, log_probs, tail = topk_targets(
                logits, self.entries, temperature, uniforms
            )  # (T, K+S) .. (T,)
            return encode(ids, log_probs, tail, vocab)
        assert uniforms is not None
        ids, log_probs = sample_targets(logits, uniforms, temperature)  # (T, S) each
        return encode(ids, log_probs, None, vocab)

    def _flush(self, split: str) -> None:
        pending = self._pending[split]
        blocks = np.asarray([block for block, _ in pending], dtype=np.int64)  # (n,)
        arrays = {"block_index": blocks}
        for name in pending[0][1].arrays():
            arrays[name] = np.stack([encoded.arrays()[name] for _, encoded in pending])  # (n, T, ...)
        name = f"{split}-r{self.rank:04d}-{self._next_seq[split]:06d}.safetensors"
        metadata = {"format": FORMAT, "version": str(VERSION), "split": split, "mode": self.mode}
        data = save_safetensors(arrays, metadata=metadata)
        write_atomic(self.directory / name, data)
        digest = hashlib.sha256(data).hexdigest()
        self.memo.remember(self.directory / name, digest)  # read back by its record, not hashed again
        self._records.append(
            {
                "file": name,
                "split": split,
                "rank": self.rank,
                "blocks": int(blocks.size),
                "first_block": int(blocks.min()),
                "last_block": int(blocks.max()),
                "bytes": len(data),
                "sha256": digest,
            }
        )
        part = {**self.settings, "rank": self.rank, "command": self.command, "shards": self._records}
        write_atomic(self.directory / part_name(self.rank), json.dumps(part, indent=1).encode())
        self._done[split].update(blocks.tolist())
        self._next_seq[split] += 1
        pending.clear()


def finalize_cache(directory: str | Path) -> dict[str, Any]:
    """Merge the writers' parts (and an earlier manifest) into ``manifest.json``; return the manifest.

    Call once every writer has closed. Shards recorded with a missing or truncated file are left out
    (with a warning: run the cache again to rewrite their blocks); shard files no record names (an
    interrupted write) are deleted; the parts are deleted once the manifest is on disk.

    The manifest holds the settings, then ``splits``: for each split its ``blocks`` (distinct blocks
    on disk), ``complete`` and ``shards`` (``file``, ``split``, ``rank``, ``blocks``, ``first_block``,
    ``last_block``, ``bytes``, ``sha256``), and ``positions`` (blocks × T stored), ``bytes`` and
    ``bytes_per_token`` (= bytes / positions, measured on disk).
    """
    directory = Path(directory)
    manifest, parts = read_records(directory, "cache.output_dir")
    sources = [s for s in (manifest, *parts.values()) if s is not None]
    if not sources:
        raise ConfigError(
            "cache.output_dir", str(directory), "holds no cache parts", "write some blocks first"
        )
    settings = {key: sources[0][key] for key in SETTINGS if key in sources[0]}
    for source in sources[1:]:
        compare_settings(source, settings, str(directory))
    commands = [s.get("command") for s in (*parts.values(), manifest) if s is not None and s.get("command")]
    shards = valid_shards(directory, all_shards(manifest, parts), warn=False)  # writers warned
    splits: dict[str, Any] = {}
    for split, count in settings["num_blocks"].items():
        own = sorted((r for r in shards if r["split"] == split), key=lambda r: r["file"])
        present = np.zeros(count, dtype=bool)
        for record in own:
            present[read_block_index(directory / record["file"])] = True
        splits[split] = {"blocks": int(present.sum()), "complete": bool(present.all()), "shards": own}
    positions = sum(r["blocks"] for r in shards) * settings["block_size"]
    size = sum(r["bytes"] for r in shards)
    merged = {
        **settings,
        "command": commands[0] if commands else None,
        "complete": all(s["complete"] for s in splits.values()),
        "splits": splits,
        "positions": positions,
        "bytes": size,
        "bytes_per_token": size / positions if positions else None,
    }
    write_atomic(directory / MANIFEST, json.dumps(merged, indent=1).encode())
    recorded = {r["file"] for r in shards}
    for path in directory.iterdir():
        orphan = SHARD_NAME.match(path.name) and path.name not in recorded
        if orphan or PART_NAME.match(path.name) or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink()
    return merged


def _next_seq(directory: Path, split: str, rank: int) -> int:
    """One past the highest sequence number of this rank's shard files of ``split`` (any, recorded or not)."""
    seqs = [
        int(m["seq"])
        for p in directory.iterdir()
        if (m := SHARD_NAME.match(p.name)) and m["split"] == split and int(m["rank"]) == rank
    ]
    return max(seqs, default=-1) + 1
