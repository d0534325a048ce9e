"""Loading teachers and students, and checking that they share a vocabulary.

A model is given as one of:

* a Hugging Face model directory (or a hub name when online): ``"runs/teacher/export"``;
* a GGUF file, ``"models/smollm2.gguf"``: converted once into distilkit's cache, then loaded from there
  (:mod:`distilkit.models.gguf`; ``pip install 'distilkit[gguf]'``);
* a mapping of transformers config fields with ``model_type`` for random init:
  ``{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4}``; ``vocab_size``, the context length and the
  special-token ids come from the tokenizer and ``block_size`` when the mapping leaves them out;
* an ``nn.Module`` built in code;
* for the student, ``{from_teacher: {...}}``: cut from the teacher (:mod:`distilkit.models.from_teacher`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from distilkit.data.gguf import gguf_tokenizer, is_gguf
from distilkit.data.progress import LONG_LOAD_BYTES, bars_if
from distilkit.data.tokenizer import check_same_vocabulary
from distilkit.data.verified import MANIFEST, shared_memo, verify_directory
from distilkit.errors import ConfigError
from distilkit.models.from_teacher import StudentCut
from distilkit.models.gguf import load_gguf_model

ModelSpec = str | Mapping[str, Any] | nn.Module

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(field: str, name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear error for anything else."""
    if name not in _DTYPES:
        raise ConfigError(field, name, "is not a known dtype", f"use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_causal_lm(
    spec: ModelSpec,
    *,
    field: str,
    dtype: torch.dtype = torch.float32,
    defaults: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build or load a causal LM from a directory, a hub name, a config mapping or a module.

    Args:
        spec: the model, in one of the forms of this module's docstring.
        field: the config field it came from (``"model.teacher"``), named in error messages.
        dtype: the parameter dtype to load or build in (set explicitly: transformers 5 defaults to "auto").
        defaults: config fields to fill in when a mapping leaves them out (vocab size, context length,
            special-token ids).

    Returns:
        The model, in eval mode as ``from_pretrained`` returns it.
    """
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, Mapping):
        config = config_from_mapping(spec, field=field, defaults=defaults or {})
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if is_gguf(spec):
        return load_gguf_model(spec, field=field, dtype=dtype)
    if isinstance(spec, (str, os.PathLike)):
        return _from_pretrained(str(spec), field=field, dtype=dtype)
    raise ConfigError(field, spec, "is not a model", "give a model directory, a config mapping or a module")


def _from_pretrained(name: str, *, field: str, dtype: torch.dtype) -> nn.Module:
    """A directory, or a hub name (``org/model``: from the local Hugging Face cache when offline, as
    transformers resolves it). Unreadable weights (truncated, not safetensors) are a one-line error."""
    path = Path(name).expanduser()
    looks_local = looks_like_a_path(name)
    if looks_local:
        if not path.exists():
            raise ConfigError(
                field, name, "does not exist", "give a Hugging Face model directory (with config.json)"
            )
        if not path.is_dir():
            raise ConfigError(
                field, name, "is a file, not a model directory", "give the directory holding config.json"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                field, name, "has no config.json", "point at a directory written by save_pretrained or export"
            )
        check_written_directory(path, field, name)
    elif not _in_hub_cache(name):
        _refuse_unreachable_hub(field, name)
    long = not looks_local or _weights_bytes(path) >= LONG_LOAD_BYTES
    try:
        with bars_if(long):
            model = AutoModelForCausalLM.from_pretrained(str(path) if looks_local else name, dtype=dtype)
        return model.eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        problem = f"could not be loaded ({_first_line(err)})"
        raise ConfigError(field, name, problem, "check the name, or save the model again") from err


def check_written_directory(path: Path, field: str, name: str) -> None:
    """A model directory distilkit wrote (``export``, ``prune``: it holds ``distilkit-manifest.json``) must
    hold the files it was written with, byte for byte (hashes remembered by stat stamp: a ``stat`` per file
    once checked); the first difference is one line naming the file and the command that writes it again.
    Files added since (a README) are fine; a directory without a manifest is read as it is."""
    if not (path / MANIFEST).is_file():
        return
    try:
        command = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    again = f"write it again ({command})" if command else "write it again"
    verify_directory(
        path,
        shared_memo(),
        field=field,
        value=name,
        fix=f"{again}, or delete its {MANIFEST} if you changed it on purpose",
        what="the model directory",
        extra_files=True,
    )


def looks_like_a_path(name: str) -> bool:
    """Whether a model name is a local path rather than a hub name (``org/model``): it exists, starts with
    ``.``, ``/`` or ``~``, has no slash or more than one, or its first part is a local directory
    (``runs/pruned-student`` where ``runs/`` exists: a student not written yet, not a hub model)."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return True
    return Path(name.split("/")[0]).is_dir()


def _in_hub_cache(name: str) -> bool:
    """Whether the hub model ``name`` is in the local Hugging Face cache (its config, at least)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repository name: not in the cache
        return False


def _refuse_unreachable_hub(field: str, name: str) -> None:
    """A hub model that is not cached needs the hub: refused at once when offline (``HF_HUB_OFFLINE``) or when
    the hub does not answer within seconds, instead of minutes of retries."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    fix = "give a model directory (is the path right?), or download the model once where there is network"
    if offline:
        raise ConfigError(field, name, "is neither a directory nor in the local Hugging Face cache", fix)
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            field,
            name,
            f"is neither a directory nor in the local Hugging Face cache, and {endpoint.hostname} cannot be "
            f"reached ({_first_line(err)})",
            fix,
        ) from err


def _weights_bytes(directory: Path) -> int:
    """Bytes of the weight files in a model directory."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def config_from_mapping(
    spec: Mapping[str, Any], *, field: str, defaults: Mapping[str, Any]
) -> PretrainedConfig:
    """A transformers config from ``{model_type: ..., **fields}``; unknown fields are refused.

    transformers itself accepts any keyword silently, so a typo such as ``n_layers`` for GPT-2 would
    build a different model than asked; here it is an error that suggests the right name.
    """
    fields = dict(spec)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError(
            field, dict(spec), "has no model_type", "add e.g. model_type: gpt2 (or llama, qwen2)"
        )
    try:
        config = AutoConfig.for_model(model_type)
    except ValueError as err:
        raise ConfigError(
            f"{field}.model_type", model_type, "is not a transformers model type", "use e.g. gpt2, llama"
        ) from err
    known = _config_field_names(config)
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"see {type(config).__name__} for valid fields"
            raise ConfigError(f"{field}.{key}", fields[key], f"is not a {model_type} config field", hint)
    padded, size = fields.get("vocab_size"), defaults.get("vocab_size")
    if isinstance(padded, int) and isinstance(size, int) and padded > size:
        rank_zero_warn(
            f"{field}.vocab_size={padded} is above the tokenizer's {size}: its last {padded - size} rows are "
            f"padding no token uses, never trained (losses compare the first {size}) yet exported; leave "
            "vocab_size out unless you pad on purpose"
        )
    given = set(fields) | {config.attribute_map.get(k, k) for k in fields}
    given |= {alias for alias, target in config.attribute_map.items() if target in given}
    filled = {k: v for k, v in defaults.items() if v is not None and k not in given}
    return AutoConfig.for_model(model_type, **{**_resolve_aliases(config, filled), **fields})


def _config_field_names(config: PretrainedConfig) -> set[str]:
    names = set(config.to_dict()) | set(config.attribute_map)
    if dataclasses.is_dataclass(config):
        names |= {f.name for f in dataclasses.fields(config)}
    return names


def _resolve_aliases(config: PretrainedConfig, values: Mapping[str, Any]) -> dict[str, Any]:
    """Rename generic names (``max_position_embeddings``) to the family's own (``n_positions``)."""
    return {config.attribute_map.get(k, k): v for k, v in values.items()}


def vocab_rows(model: nn.Module) -> int:
    """Rows of the model's output head (its logit width), or its config's ``vocab_size``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    raise ConfigError(
        "model", type(model).__name__, "has no output head or config.vocab_size", "use a causal LM"
    )


def shared_vocab_size(student: nn.Module, teacher: nn.Module | None, tokenizer_size: int | None) -> int:
    """The logit width that student and teacher are compared on.

    Equal head sizes are used as they are. Different sizes are fine only when both cover the tokenizer:
    the rows beyond the tokenizer's size are padding (Qwen2.5 pads 151,665 tokens to 152,064 rows), so
    both are cut to the tokenizer's size. Anything else is an error naming both sizes.
    """
    student_rows = vocab_rows(student)
    if tokenizer_size is not None and tokenizer_size > student_rows:
        raise ConfigError(
            "model.student",
            f"vocabulary of {student_rows}",
            f"is smaller than the tokenizer's {tokenizer_size}",
            "build the student with vocab_size >= the tokenizer's size (leave it out of a config mapping)",
        )
    if teacher is None:
        return student_rows
    teacher_rows = vocab_rows(teacher)
    if teacher_rows == student_rows:
        return student_rows
    if tokenizer_size is not None and tokenizer_size <= min(teacher_rows, student_rows):
        return tokenizer_size
    raise ConfigError(
        "model.teacher",
        f"vocabulary of {teacher_rows}",
        f"differs from the student's {student_rows}"
        + (f" and the tokenizer's {tokenizer_size}" if tokenizer_size is not None else ""),
        "teacher and student must share a tokenizer; give the student the teacher's tokenizer and vocab_size",
    )


def check_context(field: str, model: nn.Module | None, block_size: int | None) -> None:
    """Refuse a ``block_size`` longer than the model's maximum positions (its position table overflows)."""
    if block_size is None:
        return
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    if limit and block_size > int(limit):
        raise ConfigError(
            "data.block_size",
            block_size,
            f"is longer than {field}'s {limit} positions",
            f"use block_size <= {limit}, or a model with a longer context",
        )


def load_student_and_teacher(
    student: ModelSpec | StudentCut,
    teacher: ModelSpec | None,
    *,
    teacher_dtype: str = "float32",
    vocab_size: int | None = None,
    block_size: int | None = None,
    eos_token_id: int | None = None,
) -> tuple[nn.Module, nn.Module | None, int]:
    """The student (float32, train mode), the frozen teacher (``teacher_dtype``, eval mode, no gradients) or
    None, and the logit width they are compared on (:func:`shared_vocab_size`).

    ``vocab_size``, ``block_size`` and ``eos_token_id`` (the tokenizer's) fill what config mappings leave
    out; a ``block_size`` longer than either model's context is refused. A student ``{from_teacher: {...}}``
    (or its parsed :class:`~distilkit.models.from_teacher.StudentCut`) is cut from the loaded teacher: at
    once, or provisionally when the cut waits for calibration data (``cut.pending``).
    """
    defaults = {"vocab_size": vocab_size, "max_position_embeddings": block_size}
    defaults |= {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    cut = StudentCut.parse(student)
    if cut is None:
        assert not isinstance(student, StudentCut)
        student_model = load_causal_lm(student, field="model.student", dtype=torch.float32, defaults=defaults)
        student_model.train()  # from_pretrained returns eval-mode models
    teacher_model = None
    if teacher is not None:
        dtype = parse_dtype("model.teacher_dtype", teacher_dtype)
        teacher_model = load_causal_lm(teacher, field="model.teacher", dtype=dtype, defaults=defaults)
        teacher_model.requires_grad_(False).eval()
    if cut is not None:
        if isinstance(teacher, Mapping):
            rank_zero_warn(
                f"{cut.field}: the teacher is a config mapping, so its weights are random: the student is "
                "cut from an untrained model, ranked on noise (give a trained teacher's directory instead)"
            )
        student_model = cut.build(teacher_model)
    for field, model in (("model.student", student_model), ("model.teacher", teacher_model)):
        check_context(field, model, block_size)
    return student_model, teacher_model, shared_vocab_size(student_model, teacher_model, vocab_size)


def check_model_tokenizer(field: str, spec: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a data tokenizer that is not the one saved beside the model directory (or held in the GGUF
    file) ``spec``, token for token and id for id: a ConfigError naming both and the first differing tokens.
    A model given otherwise (a config mapping, a module) has nothing to compare; a directory without
    tokenizer files is said once (its vocabulary is then checked by size only)."""
    directory = isinstance(spec, (str, os.PathLike)) and (Path(spec).expanduser() / "config.json").is_file()
    if not (directory or is_gguf(spec)):
        return
    own = tokenizer_of(spec, field)
    if own is None:
        rank_zero_warn(
            f"{field}={str(spec)!r} has no tokenizer files: its vocabulary is checked by size only"
        )
        return
    source = getattr(tokenizer, "name_or_path", "") or "the data"
    check_same_vocabulary(own, f"{field} ({spec})", tokenizer, f"data.tokenizer ({source})")


def tokenizer_of(spec: Any, field: str = "model") -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a model directory or held in a GGUF file, or None (a config mapping, a
    module, a directory without tokenizer files, a hub name)."""
    if is_gguf(spec):
        return gguf_tokenizer(spec, field=field)
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = Path(spec).expanduser()
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(path)
