"""Models from GGUF files: dequantised once by transformers, kept as a Hugging Face directory, loaded from it.

``teacher: path/model.gguf`` (and ``student:``, ``distilkit evaluate --models``, ``generate``, ``prune``)
comes here through :func:`distilkit.models.loading.load_causal_lm`. The first load reads the file with
transformers' GGUF support (every tensor dequantised into the dtype asked for) and writes the result, with
the file's tokenizer, into distilkit's cache (:mod:`distilkit.data.gguf` gives the layout and why a changed
copy is refused); later loads are a plain ``from_pretrained`` of that directory.

transformers refuses to ``save_pretrained`` a model it loaded from GGUF ("quantized with gguf and is not
serializable"), so the weights are moved, without a copy, into a model built from the same config on the
meta device, and that one is saved.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from distilkit.data.gguf import INSTALL, GGUFSource, gguf_tokenizer
from distilkit.errors import ConfigError


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def load_gguf_model(
    spec: str | os.PathLike[str],
    *,
    field: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> nn.Module:
    """A causal LM from a GGUF file, in ``dtype``, in eval mode (converted on first use, then cached).

    Args:
        spec: the ``.gguf`` file.
        field: the config field it came from, named in errors (``model.teacher``).
        dtype: the dtype the weights are dequantised into and loaded in.
        cache_dir: distilkit's cache (default: ``$DISTILKIT_CACHE``, else ``~/.cache/distilkit``).

    Raises:
        ConfigError: a missing ``gguf``/``accelerate`` package, a path that is not a readable GGUF file, an
            architecture transformers cannot load from GGUF, or a converted copy that changed on disk.
    """
    directory = converted_gguf_directory(spec, field=field, dtype=dtype, cache_dir=cache_dir)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def converted_gguf_directory(
    spec: str | os.PathLike[str],
    *,
    field: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> Path:
    """The Hugging Face directory (weights in ``dtype`` and tokenizer) distilkit converts a GGUF file into,
    converting it first if needed, without loading the model: what an inference server serves. Arguments
    and errors as :func:`load_gguf_model`."""
    source = GGUFSource(spec, field, cache_dir)
    tokenizer_dir = source.tokenizer_dir()
    return source.converted(
        f"model-{dtype_name(dtype)}",
        lambda staging: _convert(source, dtype, tokenizer_dir, staging),
        f"the weights ({dtype_name(dtype)})",
    )


def load_gguf(
    spec: str | os.PathLike[str],
    *,
    field: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (as :func:`load_gguf_model`) and the tokenizer of a GGUF file."""
    model = load_gguf_model(spec, field=field, dtype=dtype, cache_dir=cache_dir)
    return model, gguf_tokenizer(spec, field=field, cache_dir=cache_dir)


def _convert(source: GGUFSource, dtype: torch.dtype, tokenizer_dir: Path, staging: Path) -> None:
    """Write the dequantised model and the file's tokenizer (from ``tokenizer_dir``) into ``staging`` as a
    Hugging Face directory."""
    model = _dequantised(source, dtype)
    config = model.config
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)  # the same tensors, not copies
    plain.generation_config = model.generation_config
    plain.save_pretrained(staging)
    for file in tokenizer_dir.iterdir():
        if file.is_file() and not file.name.startswith("distilkit-"):
            shutil.copy2(file, staging / file.name)


def _dequantised(source: GGUFSource, dtype: torch.dtype) -> nn.Module:
    """transformers' own load of the file, every weight dequantised into ``dtype``."""
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ConfigError(
            source.field, str(source.path), "needs the accelerate package to load GGUF weights", INSTALL
        )
    options = {}
    try:
        from transformers import GgufConfig  # transformers >= 5.x: weights could stay packed; unpack them

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        directory, name = source.transformers_args()
        return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, **options)
    except Exception as err:
        raise source.conversion_failed(err, "model") from err
