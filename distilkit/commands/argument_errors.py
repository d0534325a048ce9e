"""jsonargparse's type errors as one line.

A value of the wrong type below a ``class_path`` (``--model.init_args.kd_ratio abc``) makes jsonargparse
explain every subtype of every union it tried, a dozen lines; what the user needs is the innermost field,
what was given there and what it takes: ``model.kd_ratio='abc': is not a float; give a float``.
"""

from __future__ import annotations

import re

from distilkit.errors import ConfigError

_KEY = re.compile(r'Parser key "([^"]+)":$')
_EXPECTED = re.compile(r"Expected (?:a |an )?(.+?)\. Got value: (.*)$")
_UNION = "Does not validate against any of the Union subtypes"


def one_line(message: str) -> ConfigError | None:
    """The innermost field of a jsonargparse type error, the value given there and the types it takes, as a
    :class:`ConfigError`; None when ``message`` is not such an error (it is then shown whole).

    The field is the chain of nested ``Parser key "..."`` lines down to the last one (``init_args`` left
    out, as the other errors name fields). Below it, either ``Expected T. Got value: V`` (one type), or a
    union of plain types: its ``Subtypes: [...]`` (``None`` left out) and its ``Given value: V``.
    """
    lines = message.splitlines()
    keys = [i for i, line in enumerate(lines) if _KEY.search(line.strip())]
    if not keys:
        return None
    last = keys[-1]
    field = _field([_KEY.findall(lines[i].strip())[0] for i in _chain(lines, keys)])
    block = _block(lines, last)
    if not block:
        return None
    single = _EXPECTED.search(block[0].strip())
    if single:
        wanted, value = single.groups()
        return _error(field, value, [wanted])
    items = [line.strip() for line in block if line.strip().startswith("- ")]
    if block[0].strip() != _UNION or not all(item.startswith("- Expected") for item in items):
        return None  # not a union of plain types (a class whose own arguments failed: shown whole)
    level = _indent(block[0])
    at_level = [line.strip() for line in block if _indent(line) == level]
    given = next((line for line in at_level if line.startswith("Given value:")), None)
    subtypes = next((line for line in at_level if line.startswith("Subtypes:")), None)
    if given is None or subtypes is None:
        return None
    listed = subtypes.removeprefix("Subtypes:").strip()[1:-1]  # "[<class 'int'>, <class 'NoneType'>]"
    kinds = [kind for kind in _split(listed) if "NoneType" not in kind]
    return _error(field, given.removeprefix("Given value:").strip(), kinds)


def _chain(lines: list[str], keys: list[int]) -> list[int]:
    """The key lines enclosing the last one, outermost first: each indented less than the next."""
    chain = [keys[-1]]
    for index in reversed(keys[:-1]):
        if _indent(lines[index]) < _indent(lines[chain[0]]):
            chain.insert(0, index)
    return chain


def _block(lines: list[str], key: int) -> list[str]:
    """The lines below line ``key`` that are indented more than it."""
    block = []
    for line in lines[key + 1 :]:
        if _indent(line) <= _indent(lines[key]):
            break
        block.append(line)
    return block


def _error(field: str, value: str, kinds: list[str]) -> ConfigError:
    names = " or ".join(_name(kind) for kind in kinds)
    fix = f"give {names}"
    if re.match(r"\s*[{\[].*:\S", value):  # YAML: '{a:1}' maps the key 'a:1' to null
        fix += " (YAML reads {a: 1} as a mapping only with a space after each colon)"
    return ConfigError(field, value, f"is not {names}", fix)


def _name(kind: str) -> str:
    """``<class 'int'>`` -> ``an int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
    if literal:
        return f"one of {literal.group(1)}"
    kind = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", kind)
    return f"an {kind}" if kind[:1].lower() in "aeiou" else f"a {kind}"


def _split(items: str) -> list[str]:
    """``a, b[c, d], e`` -> ``[a, b[c, d], e]``: commas outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(items):
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            parts.append(items[start:index].strip())
            start = index + 1
    return [*parts, items[start:].strip()] if items.strip() else parts


def _field(keys: list[str]) -> str:
    return ".".join(part for key in keys for part in key.split(".") if part != "init_args")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
