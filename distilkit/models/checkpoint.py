"""Models inside distilkit checkpoints: what ``checkpoint["distilkit"]`` holds, and reading models back.

A distilkit checkpoint is a Lightning checkpoint (``torch.load(weights_only=True)`` loads it) whose
``state_dict`` holds the trainable models under their attribute names (``student.``, ``peers.0.`` ...) and
never the teacher, plus one entry written by :class:`distilkit.run.RunState`:

.. code-block:: python

    checkpoint["distilkit"] = {
        "vocab_size": 4096,                      # the logit width training compared
        "models": {"student": {...}},            # the config (to_dict) of each exportable model, by prefix
        "tokenizer_files": {"tokenizer.json": "...", ...},   # the run's tokenizer, save_pretrained's files
        "rng": {"torch": ..., "python": [...], "cuda": [...]}, # random state, for an exact resume
        "wandb_run_id": "abc123",                # present when the run logged to W&B
        "adapters": {"student": {...}},          # LoRA students only: base, base_sha256, settings
        "teacher": {"kind": "live", ...},        # what taught the run: TeacherSource.identity(), or None
        "earlier_teachers": [{"until_step": 300, "teacher": {...}}],  # changed on purpose on a resume
    }
    checkpoint["distilkit_seal"] = {"sha256": "...", "scheme": 1}   # the digest of all the rest

A LoRA student's ``state_dict`` entries are its adapters only (:mod:`distilkit.models.adapters`).

Checkpoints written before the models map (distilkit 0.1) hold ``student_config`` instead; they read the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from distilkit.data.gguf import is_gguf
from distilkit.data.tokenizer import tokenizer_from_files
from distilkit.data.verified import HashMemo, shared_memo
from distilkit.errors import ConfigError
from distilkit.models.adapters import checkpoint_adapters, merged_from_checkpoint
from distilkit.models.gguf import load_gguf
from distilkit.models.loading import load_causal_lm

#: The key of a checkpoint's seal: ``{"sha256": digest of the rest, "scheme": 1}`` (:func:`seal`).
SEAL = "distilkit_seal"


class CheckpointExtras(TypedDict, total=False):
    """The schema of ``checkpoint["distilkit"]`` (see the module docstring)."""

    vocab_size: int
    models: dict[str, dict[str, Any]]
    tokenizer_files: dict[str, str]
    rng: dict[str, Any]
    wandb_run_id: str
    adapters: dict[str, dict[str, Any]]
    teacher: dict[str, Any] | None
    earlier_teachers: list[dict[str, Any]]


def read_checkpoint(path: str | Path, field: str = "ckpt_path") -> dict[str, Any]:
    """A distilkit checkpoint, loaded on the CPU with ``weights_only=True`` and checked against its seal
    (:func:`check_seal`); a clear error for all else."""
    file = Path(path)
    if not file.is_file():
        problem = "is a directory, not a checkpoint file" if file.is_dir() else "does not exist"
        raise ConfigError(field, str(path), problem, "give a .ckpt file from a run's checkpoints/")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, unpickling refused ...
        raise ConfigError(
            field,
            str(path),
            f"could not be read as a checkpoint ({_first_line(err)})",
            "give a complete .ckpt file written by distilkit fit",
        ) from err
    check_seal(checkpoint, file, field)
    if not isinstance(checkpoint, dict) or not model_configs(checkpoint):
        raise ConfigError(
            field,
            str(path),
            "is not a distilkit checkpoint of a Hugging Face model",
            "give a checkpoint written by distilkit fit",
        )
    return checkpoint


def content_digest(value: Any) -> str:
    """SHA-256 of a checkpoint's contents as loaded: every key, value and tensor (dtype, shape and bytes),
    walked in order. ``torch.load`` of a file ``torch.save`` wrote gives back the same digest; a changed byte
    in a tensor, or a changed value anywhere, gives another one."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            flat = tensor.reshape(-1).cpu().contiguous()  # (n,)
            digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        text = value if isinstance(value, (str, bytes)) else repr(value)
        data = text.encode() if isinstance(text, str) else text
        digest.update(f"{type(value).__name__}{len(data)}:".encode())
        digest.update(data)


def seal(checkpoint: dict[str, Any]) -> str:
    """Record the digest of ``checkpoint``'s contents in it (``checkpoint["distilkit_seal"]``, left out of the
    digest); the digest. :class:`distilkit.run.AtomicCheckpointIO` seals every checkpoint it writes."""
    checkpoint.pop(SEAL, None)
    digest = content_digest(checkpoint)
    checkpoint[SEAL] = {"sha256": digest, "scheme": 1}
    return digest


def check_seal(checkpoint: Any, path: Path, field: str, memo: HashMemo | None = None) -> None:
    """Refuse a checkpoint whose contents differ from its seal (changed after it was written), in one line
    naming the file and the other checkpoints beside it. A checkpoint without a seal (written by an earlier
    distilkit, or by a trainer without distilkit's checkpoint writer) is read as it is. The check is
    remembered with the file's stat stamp (``memo``, default the shared one): a file read again unchanged
    is not hashed again."""
    sealed = checkpoint.get(SEAL) if isinstance(checkpoint, dict) else None
    if not isinstance(sealed, dict) or "sha256" not in sealed:
        return
    memo = memo if memo is not None else shared_memo()
    if memo.lookup(path) == sealed["sha256"]:
        return
    contents = {k: v for k, v in checkpoint.items() if k != SEAL}
    if content_digest(contents) != sealed["sha256"]:
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name)[:3]
        raise ConfigError(
            field,
            str(path),
            "has other contents than were written (they no longer match the digest saved in it)",
            f"use another checkpoint of the run ({', '.join(others)} in {path.parent})"
            if others
            else "it cannot be used; train again",
        )
    memo.remember(path, sealed["sha256"])


def model_configs(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{state_dict prefix: config dict}`` of the exportable models of a checkpoint."""
    extras = checkpoint.get("distilkit") or {}
    if "models" in extras:
        return dict(extras["models"])
    if "student_config" in extras:  # written by distilkit 0.1
        return {"student": extras["student_config"]}
    return {}


def peer_names(checkpoint: dict[str, Any]) -> dict[str, str]:
    """``{prefix: name}`` of a cohort checkpoint's peers (``peers.0`` ...; the module's ``names`` when it
    had them, else ``peer0`` ...); empty for any other checkpoint."""
    indices = sorted(int(p.split(".")[1]) for p in model_configs(checkpoint) if p.startswith("peers."))
    names = list((checkpoint.get("hyper_parameters") or {}).get("names") or [])
    return {f"peers.{i}": str(names[i]) if i < len(names) else f"peer{i}" for i in indices}


def model_prefix(checkpoint: dict[str, Any], peer: int | str | None = None, model: str = "student") -> str:
    """The state-dict prefix of the model to read: ``model`` (the student), or the cohort's peer ``peer``
    given by index or name. A cohort checkpoint read without ``peer`` is refused, naming ``--peer`` and
    the peers it holds."""
    peers = peer_names(checkpoint)
    choices = ", ".join(f"{prefix.split('.')[1]} ({name})" for prefix, name in peers.items())
    if peer is None:
        if model in model_configs(checkpoint) or not peers:
            return model
        raise ConfigError(
            "peer",
            None,
            f"is needed: the checkpoint holds a cohort of {len(peers)} peers, {choices}",
            "choose one with --peer 0 (an index) or --peer NAME",
        )
    for prefix, name in peers.items():
        if str(peer) in (name, prefix.split(".")[1]):
            return prefix
    raise ConfigError(
        "peer",
        peer,
        "names no peer of this checkpoint" + (f" (it holds {choices})" if peers else " (it holds no cohort)"),
        "use one of those indices or names" if peers else "leave --peer out to read its student",
    )


def model_from_checkpoint(
    checkpoint: dict[str, Any], prefix: str = "student", *, where: str = "ckpt_path"
) -> nn.Module:
    """The model stored under ``prefix`` (a Hugging Face causal LM in float32, eval mode); a LoRA student's
    base rebuilt with its adapters merged in.

    Raises a :class:`ConfigError` naming the prefixes present when ``prefix`` is not one of them, and when
    the weights do not fit the stored config (or the LoRA base is not the one the adapters trained on).
    """
    configs = model_configs(checkpoint)
    if prefix not in configs:
        raise ConfigError(where, prefix, "names no model of this checkpoint", f"use one of {sorted(configs)}")
    start = f"{prefix}."
    state = {k[len(start) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(start)}
    adapters = checkpoint_adapters(checkpoint).get(prefix)
    if adapters is not None:
        return merged_from_checkpoint(adapters, state, where)
    fields = dict(configs[prefix])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [key for key in missing if key not in tied]:
        raise ConfigError(
            where,
            prefix,
            f"does not match its stored config (missing {missing}, unexpected {unexpected})",
            "use a checkpoint written by distilkit fit",
        )
    return model.eval()


def checkpoint_tokenizer(checkpoint: dict[str, Any]) -> PreTrainedTokenizerBase | None:
    """The run's tokenizer kept in a checkpoint, or None when it carries none."""
    files = (checkpoint.get("distilkit") or {}).get("tokenizer_files") or {}
    return tokenizer_from_files(files) if files else None


def load_model_and_tokenizer(
    name: str | Path, field: str = "model", prefix: str = "student", peer: int | str | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """A causal LM (float32, eval mode) and its tokenizer from a distilkit checkpoint (``.ckpt``: the model
    under ``prefix``, or the cohort's peer ``peer``), a Hugging Face model directory (its tokenizer when it
    has one) or a GGUF file."""
    path = Path(name)
    if is_gguf(name):
        return load_gguf(name, field=field)
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path, field)
        prefix = model_prefix(checkpoint, peer, prefix)
        return model_from_checkpoint(checkpoint, prefix, where=field), checkpoint_tokenizer(checkpoint)
    if path.is_file():
        raise ConfigError(
            field,
            str(name),
            "is a file but neither a .ckpt nor a .gguf file",
            "give a checkpoint, a model directory or a GGUF file",
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            field,
            str(name),
            "is neither a .ckpt file, a model directory with config.json nor a .gguf file",
            "give a checkpoint from a run, a directory written by distilkit export, or a GGUF file",
        )
    model = load_causal_lm(str(path), field=field, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def check_models_match(
    checkpoint: dict[str, Any], models: dict[str, nn.Module], where: str = "ckpt_path"
) -> None:
    """Refuse to load a checkpoint into models of another architecture: every tensor the checkpoint holds
    for a model must exist in it with the same shape, and every model tensor must be in the checkpoint.

    The error names the first tensor that differs, both shapes, and the config fields that differ.
    """
    state = checkpoint.get("state_dict") or {}
    stored_configs, adapted = model_configs(checkpoint), checkpoint_adapters(checkpoint)
    for prefix, model in models.items():
        start = f"{prefix}."
        stored = {k[len(start) :]: v for k, v in state.items() if k.startswith(start)}
        if not stored or prefix in adapted:  # adapters only: checked against their base by check_adapters
            continue
        own = dict(model.state_dict())
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        problem = next(
            (
                f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} in this {prefix}"
                for key, value in stored.items()
                if key in own and tuple(value.shape) != tuple(own[key].shape)
            ),
            None,
        )
        missing = [k for k in own if k not in stored and k not in tied]
        unexpected = [k for k in stored if k not in own]
        if problem is None and (missing or unexpected):
            problem = f"tensors missing {missing[:3]}, unexpected {unexpected[:3]}"
        if problem is None:
            continue
        config = getattr(model, "config", None)
        differ = _config_differences(stored_configs.get(prefix, {}), config.to_dict() if config else {})
        raise ConfigError(
            where,
            checkpoint.get("path", prefix),
            f"holds a {prefix} of another architecture ({problem}{'; ' + differ if differ else ''})",
            f"resume with the {prefix} settings the run was started with (its config.yaml)",
        )


def _config_differences(stored: dict[str, Any], current: dict[str, Any]) -> str:
    keys = [k for k in stored if k in current and stored[k] != current[k] and not k.startswith("_")]
    keys = [k for k in keys if k not in ("transformers_version", "dtype", "torch_dtype", "architectures")]
    return ", ".join(f"{k}: {stored[k]!r} vs {current[k]!r}" for k in keys[:4])


def trained_block_size(name: str | Path) -> int | None:
    """The ``block_size`` a distilkit checkpoint was trained with (None for a model directory, or when the
    checkpoint does not record it)."""
    if Path(name).suffix != ".ckpt":
        return None
    checkpoint = read_checkpoint(name)
    size = (checkpoint.get("hyper_parameters") or {}).get("block_size")
    return int(size) if size else None
