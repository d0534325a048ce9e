"""jsonargparse's type errors as one line.

A value of the wrong type below a ``class_path`` (``--model.init_args.kd_ratio abc``) makes jsonargparse
explain every subtype of the union it tried, a dozen lines; what the user needs is the one that names the
field: ``model.kd_ratio='abc': is not a float; give a float``.
"""

from __future__ import annotations

import re

from distilkit.errors import ConfigError

_KEY = re.compile(r'Parser key "([^"]+)":')
_EXPECTED = re.compile(r"Expected (?:a |an )?(.+?)\. Got value: (.*)$")
_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_LITERAL = re.compile(r"typing\.Literal\[(.*)\]")


def one_line(message: str) -> ConfigError | None:
    """The field, value and expected type of a jsonargparse type error, as a :class:`ConfigError`: the keys
    of the nested ``Parser key "..."`` lines joined with dots (``init_args`` left out, as the other errors
    name fields), the first ``Expected ... Got value: ...`` below them. None when ``message`` is not one."""
    keys: list[str] = []
    for line in message.splitlines():
        key = _KEY.search(line)
        if key:
            keys.append(key.group(1))
            continue
        expected = _EXPECTED.search(line)
        if expected and keys:
            wanted, value = expected.groups()
            choices = _LITERAL.fullmatch(wanted)
            if choices:
                problem = f"is not one of {choices.group(1)}"
                return ConfigError(_field(keys), value, problem, "give one of them")
            kind = _CLASS.sub(r"\1", wanted)
            return ConfigError(_field(keys), value, f"is not {_article(kind)}", f"give {_article(kind)}")
    return None


def _field(keys: list[str]) -> str:
    return ".".join(part for key in keys for part in key.split(".") if part != "init_args")


def _article(kind: str) -> str:
    return f"an {kind}" if kind[:1].lower() in "aeiou" else f"a {kind}"
