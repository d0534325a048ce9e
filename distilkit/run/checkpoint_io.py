"""Checkpoints written atomically (:func:`distilkit.files.atomic_write`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distilkit.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with a local write that cannot leave a partial file.

    Lightning serialises to memory first, but then writes through a temporary file in the system temp
    directory and *moves* it into place, which is a copy (not atomic) when that directory is on another
    file system. Here the temporary file sits beside the target (``.<name>.<random>.tmp``, which Lightning's
    ``last`` lookup ignores), is fsynced, and renamed over it: a crash at any moment leaves the previous
    checkpoint whole. Remote paths (``s3://`` ...) go to Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path, "wb") as file:
            torch.save(checkpoint, file)
