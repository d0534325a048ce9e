"""``distilkit generate``: sample text from a model and write jsonl that TextDataModule reads.

A language model makes new training data: sample the teacher, then train the student on the samples
(sequence-level distillation, Kim & Rush 2016: ``recipes/seqkd.yaml``). Each output line is
``{"prompt": ..., "completion": ..., "text": prompt + completion}``; ``text`` is what training reads.

Samples are written batch by batch to ``OUTPUT.partial`` (the settings beside it in ``OUTPUT.partial.json``)
and the file is renamed to ``OUTPUT`` when every batch is done, so ``OUTPUT`` is never half written. Each
batch draws from its own generator, seeded by ``(seed, its first sample)``: after Ctrl-C (or a kill) the
same command finishes the batches that are missing and writes exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from distilkit.data.verified import content_sha256
from distilkit.errors import ConfigError, RunInterrupted
from distilkit.files import check_writable
from distilkit.models.checkpoint import load_model_and_tokenizer
from distilkit.models.generation import context_length, generate_text
from distilkit.run.signals import GracefulStop


@dataclass(frozen=True)
class Prompt:
    """A prompt and where it was read (``file:line``), which errors about it name."""

    text: str
    where: str


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.jsonl`` file (field ``prompt`` or ``text``) or a text file (one per line; blank lines
    skipped). A row that is not JSON, or has no text, is a ConfigError naming its ``file:line``."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(
            "prompts_file", str(path), "is a directory", "give a .txt or .jsonl file of prompts"
        )
    if not file.is_file():
        raise ConfigError(
            "prompts_file", str(path), "does not exist", "give a .txt or .jsonl file of prompts"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            "prompts_file",
            str(path),
            f"is not UTF-8 ({err.reason} at byte {err.start})",
            "convert it to UTF-8",
        ) from err
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompts.append(
                Prompt(_prompt_text(line, f"{path}:{number}", file.suffix == ".jsonl"), f"{path}:{number}")
            )
    if not prompts:
        raise ConfigError("prompts_file", str(path), "holds no prompts", "write one prompt per line")
    return prompts


def _prompt_text(line: str, where: str, jsonl: bool) -> str:
    if not jsonl:
        return line
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(
            "prompts_file", where, f"is not JSON ({err.msg})", "write one JSON object per line"
        ) from err
    value = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
    if not isinstance(value, str):
        raise ConfigError(
            "prompts_file", where, "has no text in 'prompt' (or 'text')", 'give each row a "prompt" string'
        )
    return value


def check_prompt_lengths(prompts: list[Prompt], tokenizer: Any, model: Any) -> None:
    """Refuse a prompt that fills the model's context, naming its ``file:line`` (before any sampling)."""
    context = context_length(model)
    if context is None:
        return
    for prompt in prompts:
        length = len(tokenizer(prompt.text or tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        if length >= context:
            raise ConfigError(
                "prompts_file",
                prompt.where,
                f"is {length} tokens long, which fills the model's context of {context}",
                f"shorten that prompt below {context} tokens (room is left for the samples), or drop it",
            )


def generate(
    model: str,
    output_file: str,
    prompts_file: str | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    peer: int | str | None = None,
) -> Path:
    """Sample ``num_samples`` continuations of each prompt (or unconditional samples) and write jsonl.

    Args:
        model: a distilkit checkpoint (``.ckpt``) or a Hugging Face model directory with its tokenizer.
        output_file: the jsonl to write (written batch by batch beside it, then moved into place).
        prompts_file: prompts, one per line (``.txt``) or per jsonl row; None samples unconditionally
            from the EOS token.
        num_samples: samples per prompt (unconditional: in all).
        max_new_tokens: tokens to sample (capped at the model's context length minus the prompt).
        temperature: sampling temperature > 0.
        top_p: nucleus sampling mass in (0, 1].
        batch_size: sequences sampled at once.
        seed: seeds the sampling (each batch by its first sample's index: a finished rerun is the same).
        overwrite: replace an existing ``output_file``.
        peer: the peer to sample when ``model`` is a cohort's checkpoint, by index or name.

    Raises:
        RunInterrupted: Ctrl-C; the finished batches are kept, and the same command finishes the rest.
    """
    if temperature <= 0:
        raise ConfigError("temperature", temperature, "must be > 0", "use e.g. 1.0 (0.7 for safer text)")
    if not 0 < top_p <= 1:
        raise ConfigError("top_p", top_p, "must lie in (0, 1]", "use e.g. 0.95")
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(
            "num_samples/max_new_tokens/batch_size",
            (num_samples, max_new_tokens, batch_size),
            "must be >= 1",
            "use positive counts",
        )
    out = Path(output_file)
    if out.is_dir():
        raise ConfigError("output_file", str(out), "is a directory", "give a file path, e.g. samples.jsonl")
    if out.exists() and not overwrite:
        raise ConfigError(
            "output_file", str(out), "already exists", "choose a new file or pass --overwrite true"
        )
    check_writable(out, "output_file")
    prompts = read_prompts(prompts_file) if prompts_file else [Prompt("", "unconditional")]
    lm, tokenizer = load_model_and_tokenizer(model, peer=peer)
    if tokenizer is None:
        raise ConfigError("model", model, "has no tokenizer", "export the model with distilkit export first")
    check_prompt_lengths(prompts, tokenizer, lm)
    jobs = [p.text for p in prompts for _ in range(num_samples)]
    settings = {
        "model_sha256": content_sha256(Path(model)) if Path(model).exists() else model,
        "peer": peer,
        "prompts_sha256": content_sha256(Path(prompts_file)) if prompts_file else None,
        "num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "batch_size": batch_size, "seed": seed,
    }  # fmt: skip
    partial = out.with_name(f"{out.name}.partial")
    done = _resume(partial, settings, out)
    device = next(lm.parameters()).device
    stop = GracefulStop("this batch, then keeping the samples so far", f"finished batches are in {partial}")
    with stop, partial.open("a", encoding="utf-8") as file, Progress(transient=True) as progress:
        task = progress.add_task("generating", total=len(jobs), completed=done)
        for start in range(done, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            generator = torch.Generator(device=device).manual_seed(_batch_seed(seed, start))
            completions = generate_text(
                lm, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                generator=generator,
            )  # fmt: skip
            rows = [
                {"prompt": p, "completion": c, "text": p + c} for p, c in zip(batch, completions, strict=True)
            ]
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            file.flush()
            os.fsync(file.fileno())
            progress.advance(task, len(batch))
            if stop.requested and start + len(batch) < len(jobs):
                raise RunInterrupted(
                    f"Ctrl-C: {start + len(batch)} of {len(jobs)} samples are in {partial}; "
                    "run the same command again to sample only the rest"
                )
    os.replace(partial, out)
    _record(partial).unlink(missing_ok=True)
    print(f"wrote {len(jobs)} samples to {out}")
    return out


def _record(partial: Path) -> Path:
    """The settings of an unfinished run, beside its rows: ``OUTPUT.partial.json``."""
    return partial.with_name(f"{partial.name}.json")


def _resume(partial: Path, settings: dict[str, Any], out: Path) -> int:
    """How many samples an unfinished run of the same settings left in ``partial`` (its whole lines; a line
    cut by a kill is dropped); 0 for a fresh start. Another run's rows are refused, not overwritten."""
    record = _record(partial)
    if not (partial.is_file() and record.is_file()):
        partial.unlink(missing_ok=True)
        record.write_text(json.dumps(settings) + "\n", encoding="utf-8")
        return 0
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = {}
    differ = next((k for k in settings if found.get(k) != settings[k]), None)
    if differ is not None:
        raise ConfigError(
            "output_file",
            str(out),
            f"has an unfinished run in {partial} made with another {differ} ({found.get(differ)!r}, "
            f"now {settings[differ]!r})",
            f"finish it with the same settings, or delete {partial} to start over",
        )
    data = partial.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        partial.write_bytes(whole)
    return whole.count(b"\n")


def _batch_seed(seed: int, start: int) -> int:
    """The seed of the batch that begins at sample ``start``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{start}".encode()).digest()[:8], "little") >> 1
