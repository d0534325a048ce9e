"""The ``distilkit`` command: one table of every command, each with typed, documented arguments.

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's own CLI (:mod:`distilkit.commands.trainer`);
the others are functions whose signatures and docstrings jsonargparse turns into their ``--help``.
"""

from __future__ import annotations

import signal
import sys
import threading
import typing
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.text import Text

from distilkit.commands.argument_errors import one_line
from distilkit.commands.cache import run_cache
from distilkit.commands.evaluate import evaluate_command
from distilkit.commands.export import export
from distilkit.commands.generate import generate
from distilkit.commands.plot import plot
from distilkit.commands.prune import prune
from distilkit.commands.quiet import quiet_third_party
from distilkit.commands.trainer import run_lightning
from distilkit.errors import ConfigError, RunInterrupted, TrainingStopped
from distilkit.run.signals import stop_at_once


@dataclass(frozen=True)
class Command:
    """One ``distilkit`` command.

    Attributes:
        summary: the line ``distilkit --help`` shows.
        function: what runs it, parsed from its signature; None for a command parsed by a LightningCLI.
        positional: arguments given without ``--name`` (``distilkit plot RUN_DIR``).
        lightning: with no ``function``, what runs the command line (``distilkit fit ...``); its LightningCLI
            parses the recipe.
    """

    summary: str
    function: Callable[..., Any] | None = None
    positional: bool = False
    lightning: Callable[[list[str]], None] = run_lightning


COMMANDS: dict[str, Command] = {
    "fit": Command("train a student from a recipe: --config R.yaml [--ckpt_path last] [--print_config]"),
    "validate": Command("validation metrics of a model or checkpoint, written beside the run"),
    "test": Command("test metrics of a model or checkpoint, written beside the run"),
    "predict": Command("per-document NLL and perplexity of the student (and teacher), as jsonl"),
    "export": Command("write a checkpoint's student as a Hugging Face model directory", export),
    "evaluate": Command(
        "score checkpoints and model directories (perplexity, agreement, harness)", evaluate_command
    ),
    "generate": Command("sample text from a model into jsonl that training reads", generate),
    "plot": Command("redraw a run's learning_curve.png from its metrics.csv", plot, positional=True),
    "cache": Command(
        "run a recipe's teacher once, store its top-k or sampled targets to train from: --config R.yaml "
        "--output_dir DIR --mode topk --top_k 64",
        lightning=run_cache,
    ),
    "prune": Command("cut a student from the teacher into a Hugging Face model directory", prune),
}


def command_parser() -> ArgumentParser:
    """The parser of the commands that are functions, which also lists every command in ``--help``."""
    parser = ArgumentParser(
        prog="distilkit",
        description="Knowledge distillation for GPT-style causal language models. "
        "`distilkit COMMAND --help` shows a command's arguments.",
        exit_on_error=False,
    )
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = ArgumentParser(prog=f"distilkit {name}", description=command.summary, exit_on_error=False)
        if command.function is not None:
            sub.add_function_arguments(command.function, as_positional=command.positional)
        subcommands.add_subcommand(name, sub, help=command.summary)
    return parser


def run(args: list[str]) -> None:
    """Run the command ``args`` names (``args`` as on the command line, without the program name)."""
    quiet_third_party()
    if args and args[0] in COMMANDS and COMMANDS[args[0]].function is None:
        torch.set_float32_matmul_precision("high")
        COMMANDS[args[0]].lightning(args)
        return
    named = COMMANDS[args[0]].function if args and args[0] in COMMANDS else None
    if named is not None:
        args = [args[0], *bare_flags(args[1:], named)]
    parsed = command_parser().parse_args(args)
    name = parsed.command
    function = COMMANDS[name].function
    assert function is not None  # Lightning subcommands were dispatched above
    function(**parsed[name].as_dict())


def bare_flags(args: list[str], function: Callable[..., Any]) -> list[str]:
    """``--flag`` alone (last, or followed by another option) means ``--flag true`` for a boolean argument
    of a function command: ``distilkit generate --chat``."""
    flags = {f"--{name}" for name, hint in typing.get_type_hints(function).items() if hint is bool}
    given = []
    for index, arg in enumerate(args):
        given.append(arg)
        if arg in flags and (index + 1 == len(args) or args[index + 1].startswith("--")):
            given.append("true")
    return given


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``distilkit`` script; ``args`` defaults to ``sys.argv[1:]``.

    A :class:`~distilkit.errors.ConfigError` (a mistake the user can fix) and a bad argument end with one
    line on stderr and exit status 2, with no traceback; a run stopped on purpose exits 1; Ctrl-C 130 (the
    long commands keep what they computed: :class:`~distilkit.run.signals.GracefulStop`); SIGTERM 143.
    Messages print as written: no console markup or emoji codes are read in them.
    """
    argv = list(sys.argv[1:] if args is None else args)
    previous = _on_ctrl_c(stop_at_once)
    try:
        run(argv)
    except SIGTERMException:
        _say("stopped by SIGTERM:", "last.ckpt written; resume with --ckpt_path last")
        sys.exit(143)
    except (RunInterrupted, KeyboardInterrupt) as err:
        _say("stopped:", str(err) or "Ctrl-C: stopped at once")
        sys.exit(130)
    except TrainingStopped as err:
        _say("stopped:", str(err), "bold red")
        sys.exit(1)
    except ArgumentError as err:
        command = argv[0] if argv and argv[0] in COMMANDS else ""
        typed = one_line(str(err))
        if typed is not None:
            _say("error:", str(typed), "bold red")
        else:
            _say("error:", f"{err}\nSee `distilkit {command} --help`.".replace("  ", " "), "bold red")
        sys.exit(2)
    except Exception as err:
        user_error = find_config_error(err)
        if user_error is None:
            raise
        _say("error:", str(user_error), "bold red")
        sys.exit(2)
    finally:
        _on_ctrl_c(previous)


def _on_ctrl_c(handler: Any) -> Any:
    """Install ``handler`` for SIGINT (main thread only; None leaves it); the previous handler."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _say(label: str, message: str, style: str = "bold") -> None:
    """Print ``label message`` to stderr, the label styled and the message exactly as written (no markup,
    no emoji codes: ``pip install 'distilkit[gguf]'`` and ``data/:memo:/x`` stay as they are), from the first
    process only (under DDP every process fails alike)."""
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        text = Text.assemble((label, style), " ", message)
        Console(stderr=True, emoji=False).print(text, highlight=False, soft_wrap=True)


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` behind ``err``: jsonargparse and Lightning re-raise it wrapped."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
