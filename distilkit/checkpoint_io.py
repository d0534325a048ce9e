"""Checkpoints written atomically: a temporary file beside the target, fsynced, then renamed over it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with a local write that cannot leave a partial file.

    Lightning serialises to memory first, but then writes through a temporary file in the system temp
    directory and *moves* it into place, which is a copy (not atomic) when that directory is on another
    file system. Here the temporary file sits beside the target (``.<name>.<random>.tmp``, which Lightning's
    ``last`` lookup ignores), is fsynced, and ``os.replace`` swaps it in: a crash at any moment leaves the
    previous checkpoint whole. Remote paths (``s3://`` ...) go to Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
