"""Chat rows: which sources hold conversations, and each row read and checked into a list of messages.

A chat row is a jsonl line (or a parquet row) with a ``messages`` list of ``{role, content}`` (the format
of transformers' chat templates), or with ``prompt`` and ``completion``: each a string (one user turn,
one assistant turn) or a list of messages. Every message needs a known role (:data:`ROLES`) and text
content; further keys (``name``, ...) go to the template as they are. A row whose ``finish_reason`` is
``length`` (``distilkit generate --chat`` writes it when a reply reached ``max_new_tokens`` unfinished) ends
with an *unfinished* reply: its end-of-turn token is not trained on. A bad row is a one-line
:class:`~distilkit.errors.ConfigError` naming it (``file:line``) and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from distilkit.errors import ConfigError

#: The roles a message may have. Only ``assistant`` turns are trained on under ``train_on: assistant``.
ROLES = ("system", "user", "assistant", "tool")

#: ``data.train_on``: the assistant's tokens only (the default for chat rows), or every token.
TrainOn = Literal["assistant", "all"]
TRAIN_ON = ("assistant", "all")

_JSON_SUFFIXES = (".jsonl", ".json")


def is_chat_row(row: Any, text_field: str = "text") -> bool:
    """A row with ``messages``, or with ``prompt`` and ``completion`` and no ``text_field`` (``distilkit
    generate`` writes prompt, completion and their ``text``: plain text to train on)."""
    if not isinstance(row, dict):
        return False
    return "messages" in row or ("prompt" in row and "completion" in row and text_field not in row)


def is_chat_source(source: str, text_field: str = "text") -> bool:
    """Whether a source holds chat rows, judged by its first row (jsonl) or its columns (parquet)."""
    path = Path(source)
    if path.suffix in _JSON_SUFFIXES and path.is_file():
        with path.open(encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    try:
                        return is_chat_row(json.loads(line), text_field)
                    except ValueError:
                        return False  # the text reader names the bad line
        return False
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        names = set(pq.read_schema(path).names)
        return "messages" in names or ({"prompt", "completion"} <= names and text_field not in names)
    return False


def chat_sources(field: str, sources: Sequence[str], text_field: str = "text") -> bool:
    """Whether ``sources`` hold chat rows; all of them must agree (one kind of data per split)."""
    kinds = {source: is_chat_source(source, text_field) for source in sources}
    if len(set(kinds.values())) > 1:
        chat = [s for s, k in kinds.items() if k]
        text = [s for s, k in kinds.items() if not k]
        raise ConfigError(
            field,
            sources,
            f"mixes chat rows ({chat[0]}) with plain text ({text[0]})",
            "give one kind of data per split (render the text as conversations, or the chat as text)",
        )
    return any(kinds.values())


def read_conversations(
    field: str, sources: Sequence[str], train_on: TrainOn
) -> Iterator[tuple[str, list[dict[str, Any]], bool]]:
    """``(where, messages, finished)`` of every row of ``sources``, checked (:func:`messages_of`);
    ``where`` names the row (``file:line`` for jsonl, ``file row N`` otherwise); ``finished`` is false when
    the last reply was cut off (:func:`finished`)."""
    for source in sources:
        for where, row in _rows(field, source):
            messages = messages_of(field, where, row)
            if train_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
                raise ConfigError(
                    field,
                    where,
                    "has no assistant turn to train on",
                    "add the assistant's reply, drop the row, or set data.train_on: all",
                )
            yield where, messages, finished(row)


def finished(row: Any) -> bool:
    """False for a row whose last reply was cut off before its end-of-turn token (``finish_reason:
    length``, as ``distilkit generate --chat`` writes it); true otherwise."""
    return not (isinstance(row, dict) and row.get("finish_reason") == "length")


def messages_of(field: str, where: str, row: Any) -> list[dict[str, Any]]:
    """The checked messages of a chat row: a non-empty list of ``{role, content}`` with a known role and
    text content (further keys are passed to the template as they are)."""
    if not is_chat_row(row):
        raise ConfigError(
            field,
            where,
            "has neither 'messages' nor 'prompt' and 'completion'",
            "give every row of a chat file a messages list of {role, content}",
        )
    if "messages" in row:
        return _checked(field, where, "messages", row["messages"])
    prompt, completion = row["prompt"], row["completion"]
    turns = _as_turns(field, where, "prompt", prompt, "user")
    return turns + _as_turns(field, where, "completion", completion, "assistant")


def _as_turns(field: str, where: str, key: str, value: Any, role: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _checked(field, where, key, value)


def _checked(field: str, where: str, key: str, messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(
            field,
            where,
            f"has {key}={_short(messages)}, not a non-empty list of messages",
            f"make {key!r} a list of {{role, content}}",
        )
    for index, message in enumerate(messages):
        name = f"{key}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(
                field,
                where,
                f"has {name}={_short(message)}",
                "make every message a {role, content} mapping",
            )
        if message["role"] not in ROLES:
            raise ConfigError(
                field,
                where,
                f"has {name}.role={message['role']!r}, not a known role",
                f"use one of {', '.join(ROLES)}",
            )
        if not isinstance(message["content"], str):
            raise ConfigError(
                field,
                where,
                f"has {name}.content of type {type(message['content']).__name__}, not text",
                "make every content a string",
            )
    return messages


def _rows(field: str, source: str) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    if path.suffix in _JSON_SUFFIXES:
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{source}:{number}", json.loads(line)
                except ValueError as err:
                    raise ConfigError(
                        field, f"{source}:{number}", f"is not a JSON object ({err})", "fix that line"
                    ) from err
        return
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{source} row {number}", row


def conversation_texts(field: str, sources: Sequence[str]) -> Iterator[str]:
    """The content of every message (what a tokenizer trained on chat data learns from)."""
    for _, messages, _ in read_conversations(field, sources, "all"):
        yield from (message["content"] for message in messages)


def check_chat_settings(
    sources: Mapping[str, Sequence[str] | None],
    chat_template: str | None,
    train_on: str | None,
    text_field: str = "text",
) -> bool:
    """Whether the data is chat rows, with every split of one kind and ``train_on``, ``chat_template`` and
    ``text_field`` set only where they mean something.

    Args:
        sources: ``{"train": [...], "val": [...] or None, ...}`` the splits' sources.
        chat_template: ``data.chat_template``.
        train_on: ``data.train_on``.
        text_field: ``data.text_field`` (plain text only).
    """
    is_chat = chat_sources("data.train_files", sources["train"] or [], text_field)
    kind = "chat rows" if is_chat else "plain text"
    for name, split_sources in sources.items():
        chat = split_sources is not None and chat_sources(f"data.{name}_files", split_sources, text_field)
        if split_sources is not None and chat != is_chat:
            raise ConfigError(
                f"data.{name}_files",
                split_sources,
                f"hold another kind of data than data.train_files ({kind})",
                "give every split the same kind: all chat rows or all plain text",
            )
    if train_on is not None and train_on not in TRAIN_ON:
        raise ConfigError("data.train_on", train_on, "is not a choice", f"use one of {TRAIN_ON}")
    if not is_chat and train_on == "assistant":
        raise ConfigError(
            "data.train_on", train_on, "needs chat rows, but data.train_files hold plain text",
            "give rows with messages (or prompt and completion), or drop data.train_on",
        )  # fmt: skip
    if not is_chat and chat_template is not None:
        raise ConfigError(
            "data.chat_template", chat_template[:40], "is set, but data.train_files hold plain text",
            "give rows with messages (or prompt and completion), or drop data.chat_template",
        )  # fmt: skip
    if is_chat and text_field != "text":
        raise ConfigError(
            "data.text_field",
            text_field,
            "is set, but data.train_files hold chat rows (read by their messages)",
            "drop data.text_field",
        )
    return is_chat


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
