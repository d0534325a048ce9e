"""``distilkit export``: a checkpoint's student as a Hugging Face model directory, with its tokenizer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from distilkit.errors import ConfigError
from distilkit.models import parse_dtype


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The files ``save_pretrained`` writes, as ``{file name: text}`` (kept inside checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_text(encoding="utf-8") for path in Path(tmp).iterdir() if path.is_file()}


def load_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """Load a distilkit checkpoint with ``weights_only=True``; a clear error for anything else."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            "ckpt_path", str(ckpt_path), "does not exist", "give a .ckpt file from a run's checkpoints/"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "distilkit" not in checkpoint or "student_config" not in checkpoint["distilkit"]:
        raise ConfigError(
            "ckpt_path",
            str(ckpt_path),
            "is not a distilkit checkpoint of a Hugging Face student",
            "export checkpoints written by `distilkit fit`",
        )
    return checkpoint


def load_student(ckpt_path: str | Path) -> tuple[Any, PreTrainedTokenizerBase | None]:
    """The student of a distilkit checkpoint as a Hugging Face model (eval mode), and the run's tokenizer."""
    checkpoint = load_checkpoint(ckpt_path)
    extra = checkpoint["distilkit"]
    fields = dict(extra["student_config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k[len("student.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    if unexpected or [key for key in missing if key not in tied]:
        raise ConfigError(
            "ckpt_path",
            str(ckpt_path),
            f"does not match its student (missing {missing}, unexpected {unexpected})",
            "export a checkpoint written by the same distilkit version",
        )
    files = extra.get("tokenizer_files") or {}
    return student.eval(), (_tokenizer_from_files(files) if files else None)


def load_model_and_tokenizer(
    name: str | Path, field: str = "model"
) -> tuple[Any, PreTrainedTokenizerBase | None]:
    """A causal LM and its tokenizer from a distilkit checkpoint (``.ckpt``) or a Hugging Face directory."""
    path = Path(name)
    if path.suffix == ".ckpt":
        return load_student(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            field,
            str(name),
            "is neither a .ckpt file nor a model directory with config.json",
            "give a checkpoint from a run or a directory written by distilkit export",
        )
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def export_student(
    ckpt_path: str | Path, output_dir: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write the student of ``ckpt_path`` and the run's tokenizer to ``output_dir``.

    ``dtype`` (``float32``, ``bfloat16`` or ``float16``) is the dtype of the saved weights.
    The directory is written beside its final place and renamed into it, so a failure leaves no half
    export; an existing non-empty ``output_dir`` is refused unless ``overwrite``.

    Returns:
        ``output_dir``, which ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` load.
    """
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            "output_dir",
            str(out),
            "already exists and is not empty",
            "choose a new directory or pass --overwrite true",
        )
    torch_dtype = parse_dtype("dtype", dtype)
    student, tokenizer = load_student(ckpt_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        student.to(torch_dtype).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def export_main(args: list[str]) -> None:
    """``distilkit export --ckpt_path C --output_dir D [--dtype bfloat16] [--overwrite true]``."""
    parser = ArgumentParser(
        prog="distilkit export", description=(export_student.__doc__ or "").splitlines()[0]
    )
    parser.add_function_arguments(export_student)
    config = parser.parse_args(args)
    out = export_student(config.ckpt_path, config.output_dir, config.dtype, config.overwrite)
    print(f"exported the student to {out}")
