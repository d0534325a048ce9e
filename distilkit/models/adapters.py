"""LoRA students: a pretrained student trained through low-rank adapters, its own weights frozen.

``student_adapter: {r: 16, alpha: 32, target_modules: [c_attn], dropout: 0.0}`` on the module injects LoRA
layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") into the student with the
``peft`` library (the ``lora`` extra): each targeted linear map ``W x`` becomes ``W x + (alpha / r)·B A x``
with ``A`` (r, in) and ``B`` (out, r), ``B`` starting at zero, so training starts from the pretrained
student exactly. The student stays a plain Hugging Face model with LoRA layers inside (its body and
output head work as before).

Only ``A`` and ``B`` train: the optimizer sees only them and checkpoints hold only them. The frozen base
comes back from the student spec when a checkpoint is loaded (as the teacher does), and a content hash of
its weights, recorded in the checkpoint, makes sure it is the base the adapters were trained on.
``distilkit export`` rebuilds that base, loads the adapters and merges them into plain weights
(``W + (alpha / r)·B A``).

A checkpoint's record (``checkpoint["distilkit"]["adapters"][prefix]``), all plain values:

.. code-block:: python

    {"base": "/abs/path/to/student",   # the student spec: a model directory (absolute) or hub name
     "base_sha256": "9f2c...",         # weights_sha256 of the base before the adapters were injected
     "settings": {"r": 16, "alpha": 32, "target_modules": ["c_attn"], "dropout": 0.0}}
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distilkit.errors import ConfigError
from distilkit.models.loading import load_causal_lm

FIELD = "model.student_adapter"
DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "target_modules": None, "dropout": 0.0}
_ATTRIBUTE = "distilkit_adapter"  # the record, kept on the adapted model


def adapter_settings(spec: Mapping[str, Any], field: str = FIELD) -> dict[str, Any]:
    """``spec`` checked and completed with :data:`DEFAULTS` (``target_modules: None`` lets peft choose the
    family's usual modules: ``c_attn`` for gpt2, ``q_proj`` and ``v_proj`` for llama)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(field, spec, "must be a mapping", "e.g. {r: 16, alpha: 32}")
    for key in spec:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use {sorted(DEFAULTS)}"
            raise ConfigError(f"{field}.{key}", spec[key], "is not a LoRA setting", hint)
    settings = {**DEFAULTS, **spec}
    r, alpha, dropout = settings["r"], settings["alpha"], settings["dropout"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{field}.r", r, "must be a positive integer", "use e.g. 16")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"{field}.alpha", alpha, "must be a number > 0", "use e.g. 2 x r")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{field}.dropout", dropout, "must lie in [0, 1)", "use e.g. 0.0")
    modules = settings["target_modules"]
    if isinstance(modules, str):
        modules = [modules]
    if modules is not None and (not modules or not all(isinstance(m, str) and m for m in modules)):
        raise ConfigError(
            f"{field}.target_modules", modules, "must be a list of module names", "e.g. [c_attn, c_proj]"
        )
    return {"r": r, "alpha": alpha, "target_modules": None if modules is None else list(modules),
            "dropout": float(dropout)}  # fmt: skip


def attach_adapter(model: nn.Module, spec: Mapping[str, Any] | None, *, base: Any) -> nn.Module:
    """Inject LoRA adapters into ``model`` (in place) and freeze everything else; ``spec`` None: no-op.

    Args:
        model: the loaded student.
        spec: the ``student_adapter`` mapping.
        base: the student spec the model was loaded from: a model directory or hub name (what a checkpoint
            rebuilds the base from), or a module given in code (then only this process has the base).

    Raises:
        ConfigError: a bad setting, a student that is not pretrained (a config mapping or a cut), target
            modules the student does not have, or a missing ``peft``.
    """
    if spec is None:
        return model
    settings = adapter_settings(spec)
    name = _base_name(base)
    peft = _peft()
    digest = weights_sha256(model)
    config = peft.LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        target_modules=settings["target_modules"],
        lora_dropout=settings["dropout"],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # gpt2's Conv1D: peft sets it
        try:
            peft.inject_adapter_in_model(config, model)
        except ValueError as err:
            raise ConfigError(
                f"{FIELD}.target_modules",
                settings["target_modules"],
                f"does not fit the student ({_first_line(err)})",
                "name modules of the student, e.g. [c_attn] for gpt2, [q_proj, v_proj] for llama",
            ) from err
    setattr(model, _ATTRIBUTE, {"base": name, "base_sha256": digest, "settings": settings})
    return model


def adapter_record(model: nn.Module) -> dict[str, Any] | None:
    """The record of an adapted model (module docstring), or None for a model without adapters."""
    return getattr(model, _ATTRIBUTE, None)


def frozen_base(model: nn.Module) -> dict[str, Tensor]:
    """The state entries of an adapted model that do not train (its base), by state-dict key; empty for a
    model without adapters. Checkpoints leave them out; loading takes them from the model itself."""
    if adapter_record(model) is None:
        return {}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in trainable}


def check_adapters(model: nn.Module, checkpoint: Mapping[str, Any], prefix: str) -> None:
    """Refuse a checkpoint whose adapters do not fit ``model``: adapters on one side only, other settings,
    or another base (compared by content hash, not size)."""
    stored = checkpoint_adapters(checkpoint).get(prefix)
    record = adapter_record(model)
    if stored is None and record is None:
        return
    if stored is None or record is None:
        has = "holds LoRA adapters" if stored is not None else "holds a whole student, not LoRA adapters"
        raise ConfigError(
            "ckpt_path", prefix, f"the checkpoint {has}", f"set {FIELD} as in the run that wrote it"
        )
    if stored["settings"] != record["settings"]:
        raise ConfigError(
            FIELD,
            record["settings"],
            f"differs from the checkpoint's adapters {stored['settings']}",
            "use the settings of the run that wrote it",
        )
    _check_hash(record["base_sha256"], stored, f"model.{prefix}", record["base"])


def checkpoint_adapters(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{prefix: record}`` of a checkpoint's adapted models."""
    return dict((checkpoint.get("distilkit") or {}).get("adapters") or {})


def merged_from_checkpoint(record: Mapping[str, Any], state: Mapping[str, Tensor], where: str) -> nn.Module:
    """The plain model an adapter checkpoint stands for: its base rebuilt (and checked by hash), the
    adapters in ``state`` (keys without the model's prefix) loaded and merged into the weights."""
    base = record.get("base")
    if base is None:
        raise ConfigError(
            where,
            "student given in code",
            "the LoRA student's base model was a module built in code, so the checkpoint cannot rebuild it",
            "merge in Python instead: merge_adapters(module.student)",
        )
    model = load_causal_lm(base, field=f"{where} (the LoRA base model)", dtype=torch.float32)
    attach_adapter(model, record["settings"], base=base)
    _check_hash(adapter_record(model)["base_sha256"], record, where, base)  # type: ignore[index]
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    adapters = set(model.state_dict()) - set(frozen_base(model))
    if unexpected or adapters & set(missing):
        raise ConfigError(
            where,
            base,
            f"the checkpoint's adapters do not fit the base (missing {sorted(adapters & set(missing))}, "
            f"unexpected {unexpected})",
            "use a checkpoint written by distilkit fit with student_adapter",
        )
    return merge_adapters(model).eval()


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``model`` into its base weights (``W + (alpha / r)·B A``) and put the plain
    layer back, in place: the result is an ordinary Hugging Face model with the adapted model's logits."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for attribute in (_ATTRIBUTE, "peft_config"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    return model.requires_grad_(True)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's state (names, dtypes, shapes and bytes, in key order): equal exactly when
    the weights are equal, whatever their size."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_hash(actual: str, record: Mapping[str, Any], where: str, base: Any) -> None:
    if actual != record["base_sha256"]:
        raise ConfigError(
            where,
            base,
            f"is not the base model the adapters were trained on (its weights hash to {actual[:12]}..., "
            f"the checkpoint's base to {str(record['base_sha256'])[:12]}...)",
            "restore that base model, or train new adapters on this one",
        )


def _base_name(base: Any) -> str | None:
    """Where a checkpoint finds the base again: an absolute directory, a hub name, or None for a module."""
    if isinstance(base, nn.Module):
        return None
    if isinstance(base, (str, Path)):
        path = Path(base).expanduser()
        return str(path.resolve()) if path.exists() else str(base)
    raise ConfigError(
        "model.student",
        base,
        "LoRA adapts a pretrained student, and this one is built here (random init or cut from the teacher)",
        "give the student as a model directory (e.g. one written by distilkit prune), or drop "
        "student_adapter",
    )


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ConfigError(
            FIELD, "peft", "LoRA students need the peft library, which is not installed",
            "install the lora extra: pip install 'distilkit[lora]'",
        ) from err  # fmt: skip
    return peft


def _first_line(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0]
