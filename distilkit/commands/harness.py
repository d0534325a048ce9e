"""EleutherAI's lm-evaluation-harness on distilkit models (``eval`` extra: ``pip install 'distilkit[eval]'``).

``distilkit evaluate --lm_eval_tasks [...]`` scores every model with the harness: a checkpoint's student
as the same Hugging Face model ``distilkit export`` writes, or a model directory. A task is

- a task that ships with distilkit (``distilkit/lm_eval_tasks``; ``distilkit_python_reference`` is bits per
  byte on the built-in corpus's held-out documents),
- a task YAML file, for example one on local files (``dataset_path: json`` and
  ``dataset_kwargs: {data_files: {test: my.jsonl}}``): no network needed,
- or any task name the harness knows (``hellaswag``; its data set must be downloadable or cached).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distilkit.errors import ConfigError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
FIELD = "lm_eval_tasks"


class Harness:
    """The harness, its task index and settings, built once and run on one model after another.

    Args:
        tasks: task names or task YAML paths (see the module docstring).
        limit: score only the first ``limit`` documents of each task (None: all).
        batch_size: documents scored at once.
    """

    def __init__(self, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8) -> None:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError as err:
            raise ConfigError(
                FIELD,
                list(tasks),
                f"needs lm-evaluation-harness, which is not installed ({err})",
                "install it with pip install 'distilkit[eval]'",
            ) from err
        if not tasks:
            raise ConfigError(FIELD, list(tasks), "is empty", "name at least one task or task YAML file")
        if limit is not None and limit < 1:
            raise ConfigError(
                "lm_eval_limit", limit, "must be >= 1", "give a document count, or None for all"
            )
        self._evaluate, self._model_class = lm_eval.simple_evaluate, HFLM
        self.tasks, self.limit, self.batch_size = list(tasks), limit, batch_size
        self.manager = task_manager(self.tasks)

    def scores(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` for a Hugging Face causal LM and its tokenizer (filters other than
        ``none`` appear as ``metric,filter``; standard errors are left out)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = self._model_class(
            pretrained=model.to(device), tokenizer=tokenizer, batch_size=self.batch_size, device=device
        )
        results = self._evaluate(
            model=lm,
            tasks=self.tasks,
            task_manager=self.manager,
            limit=self.limit,
            bootstrap_iters=0,
            log_samples=False,
        )
        return {task: _metrics(values) for task, values in (results or {}).get("results", {}).items()}


def task_manager(tasks: Sequence[str]) -> Any:
    """A harness ``TaskManager`` that knows distilkit's tasks, and the harness's own only when a task needs
    them (indexing those ~15,000 YAML files takes seconds). Unknown names and missing files are refused."""
    from lm_eval.tasks import TaskManager

    names = [task for task in tasks if not _is_path(task)]
    for path in (task for task in tasks if _is_path(task)):
        if not Path(path).is_file():
            raise ConfigError(FIELD, path, "is not a file", "give the path of a task YAML file")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=str(TASKS_DIR))
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise ConfigError(
                FIELD,
                name,
                "is not a task the harness knows",
                f"did you mean {close}?" if close else "give a task name or the path of a task YAML file",
            )
    return manager


def _is_path(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) or "/" in task


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """Harness result keys look like ``acc,none`` and ``acc_stderr,none``; keep the values as ``acc``."""
    kept = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and "_stderr" not in metric and isinstance(value, (int, float)):
            kept[metric if filter_name == "none" else key] = float(value)
    return kept
