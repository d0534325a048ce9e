"""Every use of a private Lightning API in distilkit, in one place, each with the reason no public API does.

``tests/run/test_lightning_internals.py`` fails loudly when one of them moves, so a Lightning upgrade that
breaks one is caught by the test suite, not by a user. ``pyproject.toml`` pins the Lightning versions these
are tested with.
"""

from __future__ import annotations

from typing import Any


def log_pending_step(trainer: Any) -> None:
    """Write the finishing training step's row to the loggers now, before a checkpoint of that step.

    A checkpoint saved in ``on_train_batch_end`` (``every_n_train_steps``) comes before Lightning logs the
    step; a kill between the two lost that row for good, since the resumed run starts after the step.
    Lightning logs the row again afterwards: distilkit's CSV logger drops the repeat, W&B merges rows of one
    step. Only inside ``on_train_batch_end`` (the batch processed, not yet completed) and when Lightning
    will log this step. Private: the logger connector holds the step's pending metrics; no public API
    exposes or flushes them.
    """
    connector, progress = trainer._logger_connector, trainer.fit_loop.epoch_loop.batch_progress.current
    inside_batch_end = trainer.training and progress.processed > progress.completed
    if not inside_batch_end or trainer.fit_loop._should_accumulate() or not connector.should_update_logs:
        return
    connector.log_metrics(connector.metrics["log"])  # also flushes each logger (CSV written to disk)


#: ``LightningCLI._parse_ckpt_path``: overridden by the CLI (see ``DistilCLI._parse_ckpt_path``). Lightning
#: calls it from ``LightningCLI.__init__`` with no public switch to turn it off.
CLI_PARSE_CKPT_PATH = "_parse_ckpt_path"
