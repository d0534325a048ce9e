"""``distilkit generate``: sample text from a model and write jsonl that TextDataModule reads.

A language model makes new training data: sample the teacher, then train the student on the samples
(sequence-level distillation, Kim & Rush 2016: ``recipes/seqkd.yaml``). Each output line is
``{"prompt": ..., "completion": ..., "text": prompt + completion}``; ``text`` is what training reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.progress import Progress

from distilkit.errors import ConfigError
from distilkit.files import atomic_write, check_writable
from distilkit.models.checkpoint import load_model_and_tokenizer
from distilkit.models.generation import generate_text


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (field ``prompt`` or ``text``) or a text file (one per line)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            "prompts_file", str(path), "does not exist", "give a .txt or .jsonl file of prompts"
        )
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in lines]
        return [row.get("prompt", row.get("text", "")) for row in rows]
    return lines


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
) -> Path:
    """Sample ``num_samples`` continuations of each prompt (or unconditional samples) and write jsonl.

    Args:
        model: a distilkit checkpoint (``.ckpt``) or a Hugging Face model directory with its tokenizer.
        output_file: the jsonl to write (written whole, then moved into place).
        prompts_file: prompts, one per line (``.txt``) or per jsonl row; None samples unconditionally
            from the EOS token.
        num_samples: samples per prompt (unconditional: in all).
        max_new_tokens: tokens to sample (capped at the model's context length minus the prompt).
        temperature: sampling temperature > 0.
        top_p: nucleus sampling mass in (0, 1].
        batch_size: sequences sampled at once.
        seed: seeds the sampling.
        overwrite: replace an existing ``output_file``.
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
    if out.exists() and not overwrite:
        raise ConfigError(
            "output_file", str(out), "already exists", "choose a new file or pass --overwrite true"
        )
    check_writable(out, "output_file")
    lm, tokenizer = load_model_and_tokenizer(model)
    if tokenizer is None:
        raise ConfigError("model", model, "has no tokenizer", "export the model with distilkit export first")
    prompts = read_prompts(prompts_file) if prompts_file else [""]
    jobs = [p for p in prompts for _ in range(num_samples)]
    torch.manual_seed(seed)
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("generating", total=len(jobs))
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            completions = generate_text(
                lm, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
            )
            rows += [
                {"prompt": p, "completion": c, "text": p + c} for p, c in zip(batch, completions, strict=True)
            ]
            progress.advance(task, len(batch))
    with atomic_write(out) as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"wrote {len(rows)} samples to {out}")
    return out
