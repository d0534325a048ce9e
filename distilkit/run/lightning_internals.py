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


#: ``RichProgressBar._get_train_description``: overridden by :class:`distilkit.callbacks.DistilProgressBar`,
#: which shows ``Epoch 6`` where Lightning shows ``Epoch 6/-2`` (a run of ``max_epochs: -1``); the bar's
#: description has no public setting.
RICH_TRAIN_DESCRIPTION = "_get_train_description"


def validation_skipped_by_resume(trainer: Any) -> bool:
    """Whether this fit resumed from a checkpoint written at the end of a training batch whose validation was
    due: the checkpoint comes before that validation (``every_n_train_steps``, the end-of-run checkpoint), and
    Lightning fast-forwards past it on a resume, losing its log row and what callbacks do at a validation (the
    curriculum's plateau check). Call it in ``on_train_start``. Private: the epoch loop's restart stage and
    its ``_should_check_val_fx`` decide; no public API says either."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    return bool(loop.restarted_on_train_batch_end) and bool(loop._should_check_val_fx(fetcher))


def run_validation_now(trainer: Any) -> None:
    """Run the fit's validation loop now, as the training epoch loop does after a batch (its state flags and
    hooks set and restored the same way). Private: the epoch loop's ``val_loop`` and the logger connector's
    ``_first_loop_iter`` are not public; ``trainer.validate`` would start a separate run."""
    from lightning.pytorch.trainer import call

    connector, val_loop = trainer._logger_connector, trainer.fit_loop.epoch_loop.val_loop
    val_loop.restarting = False  # a new validation, not the restored one's remainder
    trainer.validating = True
    first_loop_iter = connector._first_loop_iter
    call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
    val_loop.run()
    trainer.training = True
    connector._first_loop_iter = first_loop_iter
