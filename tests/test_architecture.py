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

#: Lowest first. A module may import from its own layer's package and from layers below, never above. The same
#: rule is stated in the package docstring (distilkit/__init__.py) and README's architecture table; the test
#: below holds the three the same.
LAYERS: list[set[str]] = [
    {"distilkit.errors", "distilkit.files", "distilkit.batch"},
    {"distilkit.data"},
    {"distilkit.models"},
    {"distilkit.losses", "distilkit.metrics"},
    {"distilkit.teachers"},
    {"distilkit.run"},
    {"distilkit.modules"},
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


def test_the_modules_stay_small():
    """One idea per file: the distillation modules and their base each stay under 400 lines."""
    for path in (PACKAGE / "modules").glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name


def _short(unit: str) -> str:
    """``distilkit.losses`` -> ``losses/`` (a package), ``distilkit.errors`` -> ``errors.py``."""
    name = unit.removeprefix("distilkit.")
    return f"{name}/" if (PACKAGE / name).is_dir() else f"{name}.py"


def test_the_docstring_and_readme_state_the_same_layers():
    """The package docstring and README's architecture table list the layers of ``LAYERS``, in order."""
    import distilkit

    layers = [sorted(_short(unit) for unit in layer if unit.count(".") == 1) for layer in LAYERS[:-1]]
    docstring = " ".join((distilkit.__doc__ or "").split())
    stated = " -> ".join(", ".join(f"``{name}``" for name in layer) for layer in layers)
    assert stated in docstring, f"the package docstring should say: {stated}"
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Architecture") :]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")]
    assert [sorted(cell.replace("`", "").split(", ")) for cell in rows[: len(layers)]] == layers


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
