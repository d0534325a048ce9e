"""Checkpoints written atomically (:func:`distilkit.files.atomic_write`) and sealed
(:func:`distilkit.models.checkpoint.seal`), so that a checkpoint read back is the one written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distilkit.data.verified import shared_memo
from distilkit.files import atomic_write
from distilkit.models.checkpoint import seal


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with a local write that cannot leave a partial file.

    Lightning serialises to memory first, but then writes through a temporary file in the system temp
    directory and *moves* it into place, which is a copy (not atomic) when that directory is on another
    file system. Here the temporary file sits beside the target (``.<name>.<random>.tmp``, which Lightning's
    ``last`` lookup ignores), is fsynced, and renamed over it: a crash at any moment leaves the previous
    checkpoint whole. Remote paths (``s3://`` ...) go to Lightning's own writer.

    Every checkpoint is sealed first: the digest of its contents is saved in it, and distilkit refuses a
    checkpoint whose contents no longer match (``--ckpt_path``, ``export``, ``evaluate``, ``generate``). The
    digest is remembered with the written file's stat stamp, so the first read of an untouched file costs a
    ``stat``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        digest = seal(checkpoint)
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path, "wb") as file:
            torch.save(checkpoint, file)
        shared_memo().remember(Path(path), digest)
