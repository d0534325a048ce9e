"""``distilkit export``: a checkpoint's student (or a peer) as a Hugging Face model directory, with its
tokenizer, that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distilkit.data.progress import LONG_LOAD_BYTES, bars_if
from distilkit.data.verified import as_command, remember_manifest, shared_memo, write_manifest
from distilkit.files import atomic_directory, refuse_existing
from distilkit.models.checkpoint import (
    checkpoint_tokenizer,
    model_from_checkpoint,
    model_prefix,
    read_checkpoint,
)
from distilkit.models.loading import parse_dtype


def export_student(
    ckpt_path: str | Path,
    output_dir: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    model: str = "student",
    peer: int | str | None = None,
) -> Path:
    """Write the model ``model`` of ``ckpt_path`` (or the cohort's peer ``peer``, by index or name) and the
    run's tokenizer to ``output_dir``.

    The directory is staged beside its final place and renamed into it, so a failure leaves no half
    export; an existing non-empty ``output_dir`` is refused unless ``overwrite`` (checked before any work).

    Returns:
        ``output_dir``.
    """
    out = Path(output_dir)
    refuse_existing(out, overwrite=overwrite, field="output_dir")
    torch_dtype = parse_dtype("dtype", dtype)
    checkpoint = read_checkpoint(ckpt_path)
    model = model_prefix(checkpoint, peer, model)
    lm: Any = model_from_checkpoint(checkpoint, model, where="model")
    tokenizer = checkpoint_tokenizer(checkpoint)
    command = as_command("export", ckpt_path=ckpt_path, output_dir=out, dtype=dtype, peer=peer)
    with atomic_directory(out, overwrite=overwrite) as staging, bars_if(_bytes(lm) >= LONG_LOAD_BYTES):
        lm.to(torch_dtype).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        manifest = write_manifest(staging, command=command, overwrite=True)
    remember_manifest(out, manifest, shared_memo())  # read back by distilkit: checked by its hashes
    return out


def export(
    ckpt_path: str,
    output_dir: str,
    dtype: str = "float32",
    overwrite: bool = False,
    model: str = "student",
    peer: int | str | None = None,
) -> None:
    """Write a checkpoint's student (or one peer of a cohort) as a Hugging Face model directory with the
    run's tokenizer.

    Args:
        ckpt_path: a checkpoint written by ``distilkit fit`` (``RUN/checkpoints/last.ckpt``).
        output_dir: the directory to write (refused if it exists and is not empty, unless ``--overwrite``).
        dtype: dtype of the saved weights: ``float32``, ``bfloat16`` or ``float16``.
        overwrite: replace an existing ``output_dir``.
        model: which model of the checkpoint: ``student`` (default).
        peer: a peer of a ``MutualDistillationModule`` checkpoint, by index (``0``) or name (``student``);
            overrides ``model``.
    """
    out = export_student(ckpt_path, output_dir, dtype, overwrite, model, peer)
    print(f"exported {model if peer is None else f'peer {peer}'} to {out}")


def _bytes(model: Any) -> int:
    """Bytes of a model's parameters (a save shows progress only when it is large)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
