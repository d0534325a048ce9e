"""GGUF files (llama.cpp's format) as distilkit reads them: converted once, kept by content, verified.

A GGUF file holds a model's config, its tokenizer (vocabulary, merges, special tokens, chat template) and
its weights, often quantised. transformers reads all three (``from_pretrained(..., gguf_file=...)``, with
the ``gguf`` package), but converting costs seconds to minutes (building the tokenizer, dequantising every
tensor), so distilkit converts a file once and keeps plain Hugging Face directories in its cache, keyed by
the file's SHA-256::

    $DISTILKIT_CACHE/gguf/<sha256 of the .gguf>/
        tokenizer/          the tokenizer as save_pretrained writes it
        model-float32/      config.json, generation_config.json, model.safetensors and the tokenizer files
        model-bfloat16/     the same in bfloat16 (one directory per dtype asked for)
    $DISTILKIT_CACHE/gguf/hashes.json   remembered hashes (:class:`~distilkit.data.verified.HashMemo`)

Every directory is written atomically under a lock (processes that start at once convert once), with a
manifest of its files' hashes, and verified when read back (:mod:`distilkit.data.verified`). A copy that
differs from what was written is refused in one line naming the file and ``rm -r`` of the copy (the next
run converts it again): a file distilkit wrote that changed means the disk or another writer changed it,
which a silent rebuild would hide; and a rebuild costs minutes and several times the model's memory, which
a run should not spend unannounced (nor several processes at once, each replacing a directory another
is reading).

This module holds what the data layer needs (the file, its key, its tokenizer); the weights are converted
by :mod:`distilkit.models.gguf`.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from rich.console import Console
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distilkit.data.verified import HashMemo, remember_manifest, verify_directory, write_manifest
from distilkit.errors import ConfigError
from distilkit.files import atomic_directory

SUFFIX = ".gguf"
MAGIC = b"GGUF"
FORMAT = 1  # of the converted directories; a copy of another format is refused
INSTALL = "pip install 'distilkit[gguf]'"
#: What transformers raises on a GGUF it cannot convert (a damaged file raises these too, from the reader).
CONVERSION_ERRORS = (ValueError, KeyError, TypeError, IndexError, NotImplementedError, OSError, struct.error)


def is_gguf(spec: Any) -> bool:
    """Whether a model or tokenizer spec names a GGUF file (a path ending in ``.gguf``)."""
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(SUFFIX)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


class GGUFSource:
    """One GGUF file: checked, keyed by its SHA-256, and the converted copies kept for it.

    Args:
        spec: the file's path.
        field: the config field it came from (``model.teacher``, ``data.tokenizer``), named in errors.
        cache_dir: distilkit's cache (default: ``$DISTILKIT_CACHE``, else ``~/.cache/distilkit``).

    Raises:
        ConfigError: the ``gguf`` package is missing; the path does not exist, is not a file, or is not a
            GGUF file (its first bytes are not ``GGUF``).
    """

    def __init__(self, spec: str | os.PathLike[str], field: str, cache_dir: Path | None = None) -> None:
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(
                field, str(spec), "is a GGUF file, and reading one needs the gguf package", INSTALL
            )
        self.path, self.field = Path(spec).expanduser(), field
        if not self.path.is_file():
            problem = "is a directory, not a GGUF file" if self.path.is_dir() else "does not exist"
            raise ConfigError(field, str(spec), problem, "give the path of a .gguf file")
        with open(self.path, "rb") as file:
            head = file.read(len(MAGIC))
        if head != MAGIC:
            raise ConfigError(
                field,
                str(spec),
                f"is not a GGUF file (it starts with {head!r}, not {MAGIC!r})",
                "give a .gguf file written by llama.cpp or the gguf package",
            )
        if cache_dir is None:
            from distilkit.data.text import default_cache_dir  # text imports tokenizer, which imports this

            cache_dir = default_cache_dir()
        self.root = Path(cache_dir).expanduser() / "gguf"
        self.console = Console(stderr=True, soft_wrap=True, highlight=False, markup=False)
        self.memo = HashMemo(self.root / "hashes.json")
        self.sha256 = self.memo.sha256(self.path, self._hashing)
        self.home = self.root / self.sha256

    def _hashing(self, path: Path) -> None:
        self.console.print(f"hashing {path} ({_size(path.stat().st_size)}) to find its converted copy")

    def converted(self, part: str, build: Callable[[Path], None], what: str) -> Path:
        """The verified directory ``part`` of this file's copies, built by ``build(staging)`` if missing.

        Args:
            part: ``tokenizer`` or ``model-<dtype>``.
            build: writes the directory's files into the staging directory it is given.
            what: what is converted, for the progress lines (``the tokenizer``).

        Raises:
            ConfigError: the copy differs from what was written (naming the file, and ``rm -r`` of the copy
                as the fix), or the GGUF file cannot be converted.
        """
        target = self.home / part
        self.home.mkdir(parents=True, exist_ok=True)
        with FileLock(self.home / f".{part}.lock"):  # one conversion at a time across processes
            if not target.exists():
                self._build(target, build, what)
                return target
        self.memo.reload()  # another process may have converted it, and hashed its files, while we waited
        manifest = verify_directory(
            target,
            self.memo,
            field=self.field,
            value=str(self.path),
            fix=f"delete it (rm -r {target}); the next run converts {self.path.name} again",
            on_hash=self._verifying,
        )
        if manifest.get("format") != FORMAT:
            raise ConfigError(
                self.field,
                str(self.path),
                f"its converted copy {target} has format {manifest.get('format')}, not {FORMAT}",
                f"delete it (rm -r {target}); the next run converts {self.path.name} again",
            )
        return target

    def _verifying(self, path: Path) -> None:
        self.console.print(
            f"verifying {path} ({_size(path.stat().st_size)}) against the hash written with it"
        )

    def _build(self, target: Path, build: Callable[[Path], None], what: str) -> None:
        start = time.perf_counter()
        self.console.print(
            f"converting {what} of {self.path} ({_size(self.path.stat().st_size)}) into {target}, once: "
            "later runs load the copy"
        )
        with atomic_directory(target, field=self.field) as staging:
            build(staging)
            self.console.print(f"hashing the converted files of {self.path.name}")
            import transformers

            manifest = write_manifest(
                staging,
                format=FORMAT,
                source={"path": str(self.path.resolve()), "sha256": self.sha256},
                transformers=transformers.__version__,
            )
        remember_manifest(target, manifest, self.memo)
        total = sum(entry["bytes"] for entry in manifest["files"].values())
        self.console.print(
            f"converted {what} of {self.path.name} in {time.perf_counter() - start:.1f} s "
            f"({_size(total)} in {target})"
        )

    def conversion_failed(self, failure: Exception, what: str) -> ConfigError:
        """The one-line error for a conversion (``what``: ``tokenizer`` or ``model``) that raised ``failure``.

        A file that does not parse (header, metadata, tensor table, every tensor within the file) is truncated
        or corrupt; parsing costs seconds on a large vocabulary, so it is done only once something failed.
        Otherwise transformers could not convert it: an architecture it cannot read from GGUF, a tokenizer
        type it cannot build, a model that is not a causal LM. Errors of other kinds are raised as they are.
        """
        self._refuse_if_damaged(failure)
        if not isinstance(failure, CONVERSION_ERRORS):
            raise failure
        import transformers

        text, version = _first_line(failure), transformers.__version__
        if what == "tokenizer" and "architecture" not in text:
            problem = f"holds no tokenizer transformers {version} can build ({text})"
            fix = "use a GGUF with a llama, gpt2 (byte-level BPE) or t5 tokenizer, or a tokenizer directory"
        else:
            problem = f"cannot be loaded as a causal LM by transformers {version} from GGUF ({text})"
            fix = (
                "use a GGUF of an architecture transformers reads (llama, mistral, qwen2, qwen3, gemma, "
                "phi3, ...), or convert the model to a Hugging Face directory"
            )
        return ConfigError(self.field, str(self.path), problem, fix)

    def _refuse_if_damaged(self, failure: BaseException) -> None:
        from gguf import GGUFReader

        try:
            GGUFReader(self.path)
        except Exception as err:  # truncated arrays, bad offsets, unknown types: all mean a damaged file
            raise ConfigError(
                self.field,
                str(self.path),
                f"could not be read as GGUF ({_first_line(err)}): the file is truncated or corrupt",
                "download or copy it again",
            ) from failure

    def transformers_args(self) -> tuple[str, str]:
        """``(directory, gguf_file)`` as transformers' ``from_pretrained`` takes them (it joins the two)."""
        path = self.path.absolute()
        return str(path.parent), path.name

    def tokenizer_dir(self) -> Path:
        """The verified directory of the file's tokenizer (converted on first use)."""
        return self.converted("tokenizer", self._save_tokenizer, "the tokenizer")

    def _save_tokenizer(self, staging: Path) -> None:
        try:
            directory, name = self.transformers_args()
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        except Exception as err:
            raise self.conversion_failed(err, "tokenizer") from err
        tokenizer.save_pretrained(staging)


def gguf_tokenizer(
    spec: str | os.PathLike[str], field: str = "data.tokenizer", cache_dir: Path | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a GGUF file (converted once into distilkit's cache, verified on use)."""
    return AutoTokenizer.from_pretrained(GGUFSource(spec, field, cache_dir).tokenizer_dir())
