"""``distilkit generate``: sample a model into jsonl that TextDataModule trains on.

A language model makes new training data: sample the teacher, then train the student on the samples
(sequence-level distillation, Kim & Rush 2016: ``recipes/seqkd.yaml``, and on conversations
``recipes/smollm2.yaml``). Two kinds of rows:

- plain text (the default): ``{"prompt": ..., "completion": ..., "text": prompt + completion}``, the
  model's continuation of each prompt; ``text`` is what training reads.
- ``--chat true``: ``{"messages": [..., {"role": "assistant", "content": reply}], "finish_reason": ...}``,
  the model's answer to each prompt through its chat template (:mod:`distilkit.models.replies`), stopped at
  the template's end-of-turn token; ``finish_reason`` is ``stop`` or ``length`` (``max_new_tokens``
  reached first). Training reads them as chat rows.

Other fields of a jsonl prompt row (an id, a category) are copied into its output rows. Prompts are sampled
``batch_size`` at a time with a key-value cache; each batch draws from its own random stream (seeded by
``seed`` and the batch's place), and rows are written batch by batch, so an interrupted run, started again
with the same command, continues after the rows it wrote (:mod:`distilkit.commands.resumable_output`) and
ends with the file an uninterrupted run writes. Ctrl-C lets the batch in progress finish and keeps it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from distilkit.commands.resumable_output import ResumableJsonl
from distilkit.data.chat import resolve_chat_template, template_hash
from distilkit.data.chat_rows import messages_of
from distilkit.errors import ConfigError, RunInterrupted
from distilkit.files import check_writable, sha256_file
from distilkit.models.checkpoint import load_model_and_tokenizer
from distilkit.models.generation import context_length, generate_text
from distilkit.models.replies import generate_replies, prompt_ids
from distilkit.run.signals import GracefulStop
from distilkit.teachers.live import model_identity

#: The fields of a prompt row that make the prompt; the others are copied into the output rows.
PROMPT_FIELDS = ("prompt", "text", "messages", "completion")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text (plain) or conversation (chat), and the other fields of its row."""

    text: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = "unconditional"


def read_prompts(path: str | Path, chat: bool = False, name: str = "prompts") -> list[Prompt]:
    """Prompts from a text file (one per line) or a jsonl file: ``prompt`` or ``text`` (a string), or with
    ``chat``, ``messages`` (a conversation ending with the turn to answer; ``prompt`` may be one too).

    A line of a text file, or a string prompt, is one user turn in chat mode. Errors name the option
    ``name`` (``prompts``, or ``prompts_file`` when given by that name) and the row's ``file:line``.
    """
    file = Path(path)
    if file.is_dir():
        raise ConfigError(name, str(path), "is a directory", "give a .txt or .jsonl file of prompts")
    if not file.is_file():
        raise ConfigError(name, str(path), "does not exist", "give a .txt or .jsonl file of prompts")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            name, str(path), f"is not UTF-8 ({err.reason} at byte {err.start})", "convert it to UTF-8"
        ) from err
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(name, str(path), "holds no prompts", "write one prompt per line")
    if file.suffix != ".jsonl":
        return [_prompt(line, {}, chat, f"{path}:{n}") for n, line in lines]
    prompts = []
    for number, line in lines:
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ConfigError(name, where, f"is not JSON ({err})", "write one JSON object per line") from err
        if not isinstance(row, dict):
            raise ConfigError(name, where, "is not a JSON object", 'give rows such as {"prompt": "..."}')
        extra = {k: v for k, v in row.items() if k not in PROMPT_FIELDS}
        value = row.get("messages", row.get("prompt", row.get("text")))
        if isinstance(value, str):
            prompts.append(_prompt(value, extra, chat, where))
        elif isinstance(value, list) and chat:
            prompts.append(Prompt(messages=_conversation(name, where, value), extra=extra, where=where))
        elif isinstance(value, list):
            raise ConfigError(
                name, where, "is a conversation (a list of messages)", "pass --chat true to answer it"
            )
        else:
            raise ConfigError(
                name, where, "has no text in 'prompt' (or 'text', or chat 'messages')",
                'give each row a "prompt" string',
            )  # fmt: skip
    return prompts


def generate(
    model: str,
    output_file: str,
    prompts: str | None = None,
    chat: bool = False,
    chat_template: str | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    prompts_file: str | None = None,
    peer: int | str | None = None,
) -> Path:
    """Sample ``num_samples`` continuations (or, with ``chat``, answers) of each prompt and write jsonl.

    Args:
        model: a distilkit checkpoint (``.ckpt``), a Hugging Face model directory with its tokenizer, or a
            ``.gguf`` file.
        output_file: the jsonl to write. Rows go to ``OUTPUT.partial`` batch by batch, renamed to
            ``output_file`` at the end; the same command run again after an interruption continues it.
        prompts: prompts, one per line (``.txt``) or per jsonl row (``prompt``/``text``; with ``chat`` also
            ``messages``); None samples unconditionally from the EOS token (plain text only).
        chat: answer each prompt through the model's chat template and write ``messages`` rows.
        chat_template: with ``chat``: a Jinja template (its text or a file) instead of the tokenizer's.
        num_samples: samples per prompt (unconditional: in all).
        max_new_tokens: tokens to sample (capped at the model's context length minus the prompt).
        temperature: sampling temperature > 0.
        top_p: nucleus sampling mass in (0, 1].
        batch_size: sequences sampled at once.
        seed: seeds the sampling (each batch draws from a stream seeded by ``seed`` and its place).
        overwrite: replace an existing ``output_file``, and start again rather than continue.
        prompts_file: the former name of ``prompts``.
        peer: the peer to sample when ``model`` is a cohort's checkpoint, by index or name.

    Raises:
        RunInterrupted: Ctrl-C; the finished batches are kept, and the same command finishes the rest.
    """
    _check(temperature, top_p, num_samples, max_new_tokens, batch_size)
    source = _prompts_source(prompts, prompts_file, chat)
    out = Path(output_file)
    if out.is_dir():
        raise ConfigError("output_file", str(out), "is a directory", "give a file path, e.g. samples.jsonl")
    if out.exists() and not overwrite:
        raise ConfigError(
            "output_file", str(out), "already exists", "choose a new file or pass --overwrite true"
        )
    check_writable(out, "output_file")
    if not chat and chat_template is not None:
        raise ConfigError("chat_template", chat_template[:40], "is set without --chat", "pass --chat true")
    name = "prompts_file" if prompts_file is not None else "prompts"
    read = read_prompts(source, chat, name) if source else [Prompt()]
    lm, tokenizer = load_model_and_tokenizer(model, peer=peer)
    if tokenizer is None:
        raise ConfigError("model", model, "has no tokenizer", "export the model with distilkit export first")
    template = resolve_chat_template(chat_template, tokenizer, model) if chat else None
    check_prompt_lengths(read, tokenizer, lm, template, name)
    jobs = [p for p in read for _ in range(num_samples)]
    settings = {
        **{f"model_{k}": v for k, v in model_identity(model, lm).items()},
        "peer": peer,
        "prompts_sha256": sha256_file(source) if source else None,
        "chat_template_sha256": template_hash(template) if template is not None else None,
        "max_new_tokens": max_new_tokens,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "batch_size": batch_size,
        "seed": seed,
    }
    output = ResumableJsonl(out, settings, overwrite)
    done = output.resume(batch_size)
    write = _chat_batch(lm, tokenizer, template) if template is not None else _text_batch(lm, tokenizer)
    noun = "conversations" if chat else "samples"
    rows = _run(jobs, done, output, write, batch_size, seed, lm, max_new_tokens, temperature, top_p, noun)
    output.finish()
    unfinished = sum(row.get("finish_reason") == "length" for row in rows)
    resumed = f"; continued after {len(done)} rows written before" if done else ""
    stopped = (
        f"; {unfinished} answers reached max_new_tokens={max_new_tokens} unfinished" if unfinished else ""
    )
    print(f"wrote {len(rows)} {noun} to {out}{resumed}{stopped}")
    return out


Batch = Callable[[list[Prompt], dict[str, Any]], list[dict[str, Any]]]


def _run(
    jobs: list[Prompt],
    done: list[dict[str, Any]],
    output: ResumableJsonl,
    write: Batch,
    batch_size: int,
    seed: int,
    lm: nn.Module,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    noun: str,
) -> list[dict[str, Any]]:
    """Sample every batch after the ``done`` rows, appending each to ``output``; returns all rows. Ctrl-C
    lets the batch in progress finish (:class:`~distilkit.run.signals.GracefulStop`)."""
    rows = list(done)
    device = next(lm.parameters()).device
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    stop = GracefulStop(
        "this batch, then keeping the rows so far", f"finished batches are in {output.partial}"
    )
    try:
        with stop, Progress(*columns, transient=True) as progress:
            task = progress.add_task("generating", total=len(jobs), completed=len(done))
            for start in range(len(done), len(jobs), batch_size):
                generator = torch.Generator(device=device).manual_seed(_batch_seed(seed, start))
                options = {
                    "max_new_tokens": max_new_tokens,
                    "temperature": temperature,
                    "top_p": top_p,
                    "generator": generator,
                }
                batch = write(jobs[start : start + batch_size], options)
                output.append(batch)
                rows += batch
                progress.advance(task, len(batch))
                if stop.requested and len(rows) < len(jobs):
                    raise RunInterrupted(_kept(len(rows), len(jobs), noun, output))
    except KeyboardInterrupt as err:
        raise RunInterrupted(_kept(len(rows), len(jobs), noun, output)) from err
    return rows


def _kept(done: int, total: int, noun: str, output: ResumableJsonl) -> str:
    return (
        f"Ctrl-C: {done} of {total} {noun} are in {output.partial}; run the same command again to sample "
        "only the rest"
    )


def check_prompt_lengths(
    prompts: list[Prompt], tokenizer: Any, model: nn.Module, template: str | None, name: str
) -> None:
    """Refuse a prompt that fills the model's context (rendered through ``template`` in chat mode), naming
    its ``file:line``, before any sampling."""
    context = context_length(model)
    if context is None:
        return
    for prompt in prompts:
        if template is not None:
            (ids,) = prompt_ids(tokenizer, template, [prompt.messages])
            length = len(ids)
        else:
            length = len(tokenizer(prompt.text or tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        if length >= context:
            raise ConfigError(
                name, prompt.where, f"is {length} tokens long, which fills the model's context of {context}",
                f"shorten that prompt below {context} tokens (room is left for the samples), or drop it",
            )  # fmt: skip


def _text_batch(lm: nn.Module, tokenizer: Any) -> Batch:
    def write(batch: list[Prompt], options: dict[str, Any]) -> list[dict[str, Any]]:
        completions = generate_text(lm, tokenizer, [p.text for p in batch], **options)
        return [
            {"prompt": p.text, "completion": c, "text": p.text + c, **p.extra}
            for p, c in zip(batch, completions, strict=True)
        ]

    return write


def _chat_batch(lm: nn.Module, tokenizer: Any, template: str) -> Batch:
    def write(batch: list[Prompt], options: dict[str, Any]) -> list[dict[str, Any]]:
        replies = generate_replies(lm, tokenizer, [p.messages for p in batch], template=template, **options)
        return [
            {
                "messages": [*p.messages, {"role": "assistant", "content": r.text}],
                "finish_reason": "stop" if r.finished else "length",
                **p.extra,
            }
            for p, r in zip(batch, replies, strict=True)
        ]

    return write


def _batch_seed(seed: int, start: int) -> int:
    """The seed of the batch whose first row is job ``start``: a hash of ``(seed, start)``."""
    digest = hashlib.blake2b(repr(("generate", seed, start)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _prompt(text: str, extra: dict[str, Any], chat: bool, where: str) -> Prompt:
    if chat:
        return Prompt(messages=[{"role": "user", "content": text}], extra=extra, where=where)
    return Prompt(text=text, extra=extra, where=where)


def _conversation(name: str, where: str, messages: list[Any]) -> list[dict[str, Any]]:
    """A checked conversation that ends with a turn the assistant can answer (not its own)."""
    checked = messages_of(name, where, {"messages": messages})
    if checked[-1]["role"] == "assistant":
        raise ConfigError(
            name, where, "ends with an assistant turn: there is nothing to answer",
            "end each conversation with the user turn to answer",
        )  # fmt: skip
    return checked


def _prompts_source(prompts: str | None, prompts_file: str | None, chat: bool) -> str | None:
    if prompts is not None and prompts_file is not None:
        raise ConfigError(
            "prompts_file", prompts_file, "is the former name of --prompts", "give only --prompts"
        )
    source = prompts if prompts is not None else prompts_file
    if chat and source is None:
        raise ConfigError(
            "prompts", None, "is needed with --chat (there is nothing to answer)", "give --prompts FILE"
        )
    return source


def _check(temperature: float, top_p: float, num_samples: int, max_new_tokens: int, batch_size: int) -> None:
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
