"""Conversations rendered with a chat template, and which of their tokens the assistant wrote.

A conversation (checked rows: :mod:`distilkit.data.chat_rows`) is rendered with the chat template into one
string and tokenized whole (no special tokens added: the template writes its own), exactly as
``apply_chat_template`` would give it to a model.

**Which tokens are the assistant's.** For every assistant turn ``i`` the template renders the conversation
before it with the generation prompt (``messages[:i]`` + e.g. ``<|im_start|>assistant\\n``) and the
conversation through it (``messages[:i+1]``). The reply is the text between the two: the assistant's
content and what the template writes after it up to its last non-blank character, i.e. the end-of-turn
marker (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...). Not the role header (the generation prompt: at
inference the model is given it) and not the white space a template writes after the end-of-turn marker
(the model stops at the marker and never writes it). A token is the assistant's when any of its characters
is (so a token that merges the header's last character with the reply's first is trained on, never
dropped). A reply cut off unfinished (a row with ``finish_reason: length``) is its content alone: the
template writes an end-of-turn marker after it, but the model had not ended its turn there. This needs no
``{% generation %}`` markers in the template, only that rendering a longer conversation extends the
rendering of its beginning, which is checked for every turn: a template that renders earlier turns
differently once later turns follow (one that drops earlier reasoning, say) is refused naming the row,
since its assistant tokens cannot be located.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from distilkit.data.chat_rows import TrainOn, read_conversations
from distilkit.data.sources import fingerprint
from distilkit.data.token_cache import cached_map
from distilkit.data.tokenizer import tokenizer_hash
from distilkit.errors import ConfigError

#: Bumped when what a chat token cache holds changes (part of its key).
ENCODING_VERSION = "chat-2"  # chat-2: an unfinished reply's end-of-turn token is not the assistant's

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]


# -------------------------------------------------------------------------------------------- template
def resolve_chat_template(spec: str | None, tokenizer: PreTrainedTokenizerBase, tokenizer_source: Any) -> str:
    """The template to render conversations with: ``data.chat_template`` (Jinja text, or a file holding
    it), else the tokenizer's own; checked by rendering a short conversation."""
    if spec is None:
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise ConfigError(
                "data.chat_template",
                None,
                f"is not set and the tokenizer ({tokenizer_source}) has no chat template",
                "set data.chat_template to a Jinja template (its text, or a file), "
                "or use a tokenizer that has one",
            )
    elif "{{" in spec or "{%" in spec:
        template = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(
                "data.chat_template",
                spec,
                "is neither Jinja text (it has no '{{' or '{%') nor a file",
                "give the template's text, or the path of a file holding it",
            )
        template = path.read_text(encoding="utf-8")
    render(tokenizer, template, _PROBE, "data.chat_template", "a user turn and an assistant turn")
    return template


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


def render(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict[str, Any]],
    field: str,
    where: str,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as the template writes it (a template that refuses it: a ConfigError)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # noqa: BLE001 (Jinja raises anything a template does; named, with the row)
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ConfigError(
            field, where, f"is refused by the chat template ({first})", "fix the row or the template"
        ) from err
    assert isinstance(text, str)
    return text


# -------------------------------------------------------------------------------------------- encoding
def encoded_conversations(
    field: str,
    sources: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    train_on: TrainOn,
    cache_dir: Path,
) -> datasets.Dataset:
    """Every conversation of ``sources`` as ``input_ids`` and ``assistant`` (its mask), one row each.

    The rows are read and checked every time (errors name the row); the encoding is cached in
    ``cache_dir/tokens-<key>.arrow``, keyed by the files' content, the tokenizer and the template, and
    checked when read back (:mod:`distilkit.data.token_cache`).
    """
    parts = [
        fingerprint(sources, "messages"),
        tokenizer_hash(tokenizer),
        template_hash(template),
        ENCODING_VERSION,
    ]
    key = hashlib.sha256("".join(parts).encode()).hexdigest()[:16]
    rows = list(read_conversations(field, sources, train_on))
    if not rows:
        raise ConfigError(
            field, list(sources), "holds no conversations", "give files with at least one chat row"
        )

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        encoded = [
            encode_conversation(tokenizer, template, json.loads(messages), field, where, done)
            for messages, where, done in zip(
                batch["messages"], batch["where"], batch["finished"], strict=True
            )
        ]
        return {"input_ids": [ids for ids, _ in encoded], "assistant": [mask for _, mask in encoded]}

    docs = datasets.Dataset.from_dict(
        {
            "messages": [json.dumps(messages) for _, messages, _ in rows],
            "where": [where for where, _, _ in rows],
            "finished": [done for _, _, done in rows],
        }
    )
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "assistant": datasets.List(datasets.Value("int8")),
        }
    )
    cache_file = cache_dir / f"tokens-{key}.arrow"
    return cached_map(
        docs, encode, cache_file, key, ["messages", "where", "finished"], "rendering conversations", features
    )


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict[str, Any]],
    field: str,
    where: str,
    finished: bool = True,
) -> tuple[list[int], list[int]]:
    """The conversation's token ids and its assistant mask (1 on the assistant's tokens, see the module
    docstring), both ``(tokens,)``. ``finished=False``: the last message is a reply cut off before its
    end: its content is the assistant's, the end-of-turn marker the template writes after it is not.

    Raises:
        ConfigError: the template refuses the row, or renders it so that the assistant's text cannot be
            located (a longer conversation does not extend the rendering of its beginning), or the row
            opens with an assistant turn (a reply to nothing).
    """
    full = render(tokenizer, template, messages, field, where)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise ConfigError(
                field,
                where,
                "opens with an assistant turn, a reply to nothing",
                "start with a system or user turn",
            )
        before = render(tokenizer, template, messages[:index], field, where, add_generation_prompt=True)
        through = render(tokenizer, template, messages[: index + 1], field, where)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError(
                "data.chat_template",
                where,
                f"renders turn {index} (assistant) so that the conversation before it plus the generation "
                "prompt does not open the rendering through it, or that does not open the whole "
                "conversation: the assistant's tokens cannot be located",
                "use a template that renders every turn the same whatever follows it",
            )
        end = len(through.rstrip())
        if not finished and index == len(messages) - 1:
            end = _content_end(through, len(before), message["content"], where)
        spans.append((len(before), end))
    ids, offsets = _tokenize(tokenizer, full)
    return ids, assistant_mask(offsets, spans).tolist()


def assistant_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """``(tokens,)`` int8: 1 where a token's characters ``[start, end)`` (``offsets`` ``(tokens, 2)``)
    overlap one of the character ``spans``; a token without characters counts where it starts."""
    mask = np.zeros(len(offsets), dtype=np.int8)
    if not len(offsets):
        return mask
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    for begin, end in spans:
        mask |= ((starts < end) & (ends > begin)).astype(np.int8)
    return mask


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, template: str) -> int:
    """The token that ends an assistant turn under ``template`` (``<|im_end|>`` for ChatML): the last
    token of a probe reply when it lies after the reply's text; the EOS id for a template that writes no
    marker after a reply. What sampling an assistant turn stops at."""
    ids, mask = encode_conversation(tokenizer, template, _PROBE, "data.chat_template", "a probe conversation")
    full = render(tokenizer, template, _PROBE, "data.chat_template", "a probe conversation")
    _, offsets = _tokenize(tokenizer, full)
    last = max(i for i, m in enumerate(mask) if m)
    content_end = full.rfind(_PROBE[-1]["content"]) + len(_PROBE[-1]["content"])
    return int(ids[last]) if offsets[last][0] >= content_end else int(tokenizer.eos_token_id)


def _content_end(through: str, start: int, content: str, where: str) -> int:
    """Where an unfinished reply's content ends in the rendering through it (it starts at ``start``)."""
    at = through.find(content, start)
    if at < 0:
        raise ConfigError(
            "data.chat_template", where,
            "rewrites the content of an unfinished reply (finish_reason: length): where it ends is unknown",
            "use a template that writes replies as they are",
        )  # fmt: skip
    return at + len(content)


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], np.ndarray]:
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise ConfigError(
            "data.tokenizer",
            type(tokenizer).__name__,
            "gives no character offsets (a slow tokenizer), which chat data needs",
            "use a fast tokenizer (a directory with tokenizer.json)",
        ) from err
    return list(encoding["input_ids"]), np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
