"""The package's shape: imports run downward through the layers, one command table lists every command,
and the distillation module stays one idea."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from distilkit.cli import COMMANDS

PACKAGE = Path(__file__).parents[1] / "distilkit"

#: Lowest first. A module may import from its own layer's package and from layers below, never above.
LAYERS: list[set[str]] = [
    {"distilkit.errors", "distilkit.files", "distilkit.batch"},
    {"distilkit.data"},
    {"distilkit.models"},
    {"distilkit.losses"},
    {"distilkit.teachers"},  # the teacher's side of a loss: knows models, data and losses
    {"distilkit.metrics", "distilkit.guards"},
    {"distilkit.run"},
    {"distilkit.module", "distilkit.on_policy", "distilkit.mutual"},
    {"distilkit.callbacks"},
    {"distilkit.commands"},
    {"distilkit.cli", "distilkit", "distilkit.__main__", "distilkit.loggers"},
]


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its package under ``distilkit``, or the module itself."""
    parts = module.split(".")
    candidates = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
    units = set().union(*LAYERS)
    return next(name for name in candidates if name in units)


def _layer(module: str) -> int:
    unit = _unit(module)
    return next(index for index, layer in enumerate(LAYERS) if unit in layer)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distilkit"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("distilkit")}
    return names


def test_every_module_belongs_to_a_layer():
    for name in _modules():
        _layer(name)  # raises StopIteration for a module no layer names


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_downward_only(module):
    """The rule: a module imports only from its own layer or lower ones (``LAYERS``, lowest first), so
    ``losses/``, ``data/`` and ``models/`` never import the module, callbacks, run or commands, and the
    module imports no command."""
    here = _layer(module)
    upward = [name for name in _imports(_modules()[module]) if _layer(name) > here]
    assert not upward, f"{module} (layer {here}) imports from higher layers: {upward}"


def test_the_distillation_module_stays_small():
    assert len((PACKAGE / "module.py").read_text().splitlines()) < 350


def test_distilkit_help_lists_every_command_with_a_summary():
    result = subprocess.run(
        [sys.executable, "-m", "distilkit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name, command in COMMANDS.items():
        assert f"{name} {' '.join(command.summary.split())}" in text


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.function is not None])
def test_each_function_command_documents_every_argument(name, capsys):
    from distilkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "type:" in out and "(required" in out or "default:" in out
    assert "Args:" not in out, "docstring sections should become per-argument help"


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    from distilkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fitt" in err and "Traceback" not in err
