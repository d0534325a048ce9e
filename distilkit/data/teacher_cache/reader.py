"""Reading an offline teacher cache: run the teacher once, train students from its targets many times.

:class:`TeacherCache` opens a finished cache (written by :class:`~.writer.CacheWriter`, format in
:mod:`.format`), checks it against the run (:meth:`TeacherCache.check`) and returns the decoded
targets of any blocks as :class:`~.targets.SparseTargets`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from distilkit.data.teacher_cache.codec import EncodedTargets
from distilkit.data.teacher_cache.format import first_line, read_manifest, shard_problem, stored_entries
from distilkit.data.teacher_cache.targets import SparseTargets
from distilkit.data.verified import shared_memo
from distilkit.errors import ConfigError


class TeacherCache:
    """Reads a finished teacher cache: the targets of any blocks, decoded to tensors.

    Opening reads the manifest, checks every shard's size, SHA-256 and header against it and maps the block
    indices; shard data are read lazily, block by block. A shard's hash is computed once and remembered with
    the file's stat stamp (:func:`~distilkit.data.verified.shared_memo`), so a cache is read whole once
    after it is written (by the writer itself) and costs a ``stat`` per shard after that; a shard whose bytes
    changed since is hashed again and refused, naming the command that rewrites it.

    Args:
        directory: the cache directory (holding ``manifest.json``).
        field: the setting that named the directory, used in error messages.
        allow_partial: accept a cache that does not hold every block yet (reading a missing block fails).

    Raises:
        ConfigError: a missing, unreadable or inconsistent manifest or shard (the message names it).
    """

    def __init__(
        self, directory: str | Path, field: str = "model.teacher_cache", allow_partial: bool = False
    ) -> None:
        self.directory, self.field = Path(directory), field
        self.manifest = read_manifest(self.directory, field)
        self._memo = shared_memo()
        self._handles: dict[str, Any] = {}
        self._where: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (shard number, row) per block
        for split, info in self.manifest["splits"].items():
            if not info["complete"] and not allow_partial:
                total = self.manifest["num_blocks"][split]
                raise ConfigError(
                    field,
                    str(self.directory),
                    f"holds {info['blocks']} of the {total} {split} blocks (the cache run did not finish)",
                    "run `distilkit cache` again with the same settings to complete it",
                )
            self._where[split] = self._map_blocks(split, info["shards"])
        self._memo.save()

    # ------------------------------------------------------------------------------------------- settings
    @property
    def mode(self) -> str:
        return str(self.manifest["mode"])

    @property
    def entries(self) -> int:
        """K (top-k) or S (sample)."""
        return int(self.manifest["top_k" if self.mode == "topk" else "samples"])

    @property
    def tail_samples(self) -> int:
        """S, the draws from the tail after the top K (top-k; 0 when none)."""
        return int(self.manifest.get("tail_samples", 0))

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.manifest["identity"])

    @property
    def bytes_per_token(self) -> float | None:
        """Shard bytes on disk per stored position (None for an empty cache)."""
        value = self.manifest["bytes_per_token"]
        return None if value is None else float(value)

    def num_blocks(self, split: str) -> int:
        return int(self.manifest["num_blocks"][self._split(split)])

    def check(
        self,
        identity: Mapping[str, Any],
        block_size: int,
        temperature: float,
        vocab_size: int,
        mode: str | None = None,
        entries: int | None = None,
    ) -> None:
        """Refuse a cache made for another run: a ConfigError naming the field and both values.

        Args:
            identity: the run's values of the identity fields (teacher, tokenizer hash, data fingerprint
                ...); each must equal the cache's (a field the cache lacks differs).
            block_size, temperature, vocab_size: the run's; equal to the cache's (temperature to 1e-9).
            mode, entries: when given, the mode and K or S the run expects.
        """
        for key, value in identity.items():
            cached = self.manifest["identity"].get(key, "<not recorded>")
            if json.loads(json.dumps(value)) != cached:
                self._mismatch(f"identity.{key}", value, cached)
        for key, value in (("block_size", block_size), ("vocab_size", vocab_size), ("mode", mode)):
            if value is not None and value != self.manifest[key]:
                self._mismatch(key, value, self.manifest[key])
        if not math.isclose(temperature, self.temperature, rel_tol=1e-9):
            self._mismatch("temperature", temperature, self.temperature)
        if entries is not None and entries != self.entries:
            self._mismatch("top_k" if self.mode == "topk" else "samples", entries, self.entries)

    def verify(self) -> None:
        """Hash every shard again, remembered hashes aside, and compare with the manifest (reads the whole
        cache once; opening the cache already checked what changed since it was last hashed)."""
        for info in self.manifest["splits"].values():
            for record in info["shards"]:
                if _sha256(self.directory / record["file"]) != record["sha256"]:
                    raise self._damaged(record, "has other bytes than were written (its SHA-256 differs)")

    @property
    def repair(self) -> str:
        """How to rewrite missing or damaged shards: the command that made the cache, when recorded."""
        command = self.manifest.get("command")
        if command:
            return f"run `{command}` again: it rewrites only the blocks missing or damaged"
        return "run the `distilkit cache` command that made it again (same settings): it rewrites them"

    # -------------------------------------------------------------------------------------------- reading
    def read(self, split: str, block_indices: Tensor | Sequence[int]) -> EncodedTargets:
        """The stored (encoded) targets of some blocks: arrays ``(B, T, K)`` and ``(B, T)``."""
        shard_of, row_of = self._where[self._split(split)]
        blocks = np.asarray(torch.as_tensor(block_indices).reshape(-1).tolist(), dtype=np.int64)  # (B,)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= shard_of.size):
            raise IndexError(f"block indices {blocks.tolist()} outside the {shard_of.size} {split} blocks")
        absent = blocks[shard_of[blocks] < 0]
        if absent.size:
            raise ConfigError(
                self.field,
                str(self.directory),
                f"holds no {split} block {absent.tolist()[:8]}",
                "complete the cache with `distilkit cache` (same settings)",
            )
        shards = self.manifest["splits"][split]["shards"]
        names = ["ids", "codes", "offset", "step"] + (["tail"] if self.mode == "topk" else [])
        rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for block in blocks:
            handle = self._handle(shards[shard_of[block]]["file"])
            for name in names:
                rows[name].append(handle.get_slice(name)[int(row_of[block])])  # (T, K) or (T,)
        stacked = {name: np.stack(values) for name, values in rows.items()}  # (B, T, K) or (B, T)
        return EncodedTargets(**stacked)

    def targets(self, split: str, block_indices: Tensor | Sequence[int]) -> SparseTargets:
        """The decoded targets of some blocks, ``(B, T, K)``, at the cache temperature.

        Returns:
            :class:`SparseTargets` with ids long, log-probabilities float32 (within each position's
            ``step / 2`` of the teacher's), the tail log-mass float32 ``(B, T)`` (top-k) or weights 1/S
            ``(B, T, S)`` (sample). With tail draws, the weights ``(B, T, K+S)`` are the head's decoded
            probabilities and tail / S for each draw, divided by their sum (1 up to the decoding error).
            :meth:`SparseTargets.select` then keeps the positions a batch trains on.
        """
        encoded = self.read(split, block_indices)
        ids = torch.from_numpy(encoded.ids.astype(np.int64))  # (B, T, E)
        log_probs = torch.from_numpy(encoded.log_probs())  # (B, T, E)
        if self.mode == "sample":
            weights = torch.full(ids.shape, 1.0 / self.entries)  # (B, T, S)
            return SparseTargets("sample", ids, log_probs, weights=weights, temperature=self.temperature)
        assert encoded.tail is not None
        tail = torch.from_numpy(encoded.tail.astype(np.float32))  # (B, T)
        draws, mass = self.tail_samples, None
        if draws:
            each = tail.exp().div_(draws).unsqueeze(-1).expand(*tail.shape, draws)  # (B, T, S) tail / S
            mass = torch.cat([log_probs[..., : self.entries].exp(), each], -1)  # (B, T, K+S)
            mass /= mass.sum(-1, keepdim=True)
        return SparseTargets(
            "topk", ids, log_probs, tail=tail, weights=mass, temperature=self.temperature, tail_draws=draws
        )

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (data-loader workers): open files are not carried, each process reopens them."""
        return {**self.__dict__, "_handles": {}}

    # -------------------------------------------------------------------------------------------- helpers
    def _split(self, split: str) -> str:
        if split not in self._where:
            raise ConfigError(
                self.field, str(self.directory), f"has no split {split!r}", f"use {sorted(self._where)}"
            )
        return split

    def _mismatch(self, key: str, value: Any, cached: Any) -> None:
        raise ConfigError(
            f"{self.field}: {key}",
            value,
            f"the cache in {self.directory} was made with {cached!r}",
            "make a cache for this run with `distilkit cache`, or point to a matching one",
        )

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="np")
        return self._handles[file]

    def _map_blocks(self, split: str, shards: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """``(shard number, row)`` of every block of a split (−1: absent), checking each shard's header."""
        count = int(self.manifest["num_blocks"][split])
        shard_of = np.full(count, -1, dtype=np.int32)
        row_of = np.full(count, -1, dtype=np.int32)
        for number, record in enumerate(shards):
            blocks = self._check_shard(record, count)
            fresh = shard_of[blocks] < 0  # the first shard holding a block serves it
            shard_of[blocks[fresh]] = number
            row_of[blocks[fresh]] = np.flatnonzero(fresh)
        return shard_of, row_of

    def _damaged(self, record: Mapping[str, Any], problem: str) -> ConfigError:
        return ConfigError(self.field, str(self.directory), f"shard {record['file']} {problem}", self.repair)

    def _check_shard(self, record: Mapping[str, Any], count: int) -> np.ndarray:
        """A shard's block indices, once its size, SHA-256, header, tensors and blocks agree with the
        manifest."""

        def damaged(problem: str) -> ConfigError:
            return self._damaged(record, problem)

        problem = shard_problem(self.directory / record["file"], record, self._memo, save=False)
        if problem is not None:
            raise damaged(problem)
        try:
            handle = self._handle(record["file"])
            blocks = handle.get_tensor("block_index").astype(np.int64)  # (n,)
            found = {name: _shape_and_dtype(handle, name) for name in handle.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise damaged(f"is unreadable ({first_line(err)})") from err
        expected = self._expected_tensors(int(record["blocks"]))
        if found != expected:
            raise damaged(f"holds {found}, expected {expected}")
        first, last = (int(blocks.min()), int(blocks.max())) if blocks.size else (-1, -1)
        if [first, last] != [record["first_block"], record["last_block"]] or not 0 <= first <= last < count:
            raise damaged("holds other blocks than the manifest records")
        if np.unique(blocks).size != blocks.size:
            raise damaged("holds a block twice")
        return blocks

    def _expected_tensors(self, blocks: int) -> dict[str, tuple[list[int], str]]:
        """The (shape, safetensors dtype) of every tensor of a shard of ``blocks`` blocks."""
        n, t, k = blocks, self.block_size, stored_entries(self.manifest)
        ids_dtype = {"uint16": "U16", "uint32": "U32"}[self.manifest["id_dtype"]]
        expected = {"block_index": ([n], "I64"), "ids": ([n, t, k], ids_dtype), "codes": ([n, t, k], "U8")}
        names = ("offset", "step", "tail") if self.mode == "topk" else ("offset", "step")
        return expected | {name: ([n, t], "F16") for name in names}


def _shape_and_dtype(handle: Any, name: str) -> tuple[list[int], str]:
    tensor = handle.get_slice(name)
    return list(tensor.get_shape()), str(tensor.get_dtype())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()
