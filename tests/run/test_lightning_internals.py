"""Every private Lightning API distilkit uses (``distilkit.run.lightning_internals``) is still there: this
fails loudly when a Lightning upgrade moves one."""

from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.cli import LightningCLI

from distilkit.run import lightning_internals


def test_the_logger_connector_pieces_log_pending_step_uses_exist(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    connector = trainer._logger_connector
    assert callable(connector.log_metrics)
    assert isinstance(getattr(type(connector), "should_update_logs", None), property)
    assert isinstance(getattr(type(connector), "metrics", None), property)  # {"log": ...} during a loop
    assert callable(trainer.fit_loop._should_accumulate)
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    assert hasattr(progress, "processed") and hasattr(progress, "completed")


def test_lightning_cli_still_parses_the_checkpoint_hparams_where_distilkit_overrides_it():
    name = lightning_internals.CLI_PARSE_CKPT_PATH
    assert callable(getattr(LightningCLI, name))
    assert f"self.{name}()" in inspect.getsource(LightningCLI.__init__)


def test_the_loop_pieces_of_a_validation_skipped_by_a_resume_exist(tmp_path):
    """What ``validation_skipped_by_resume`` and ``run_validation_now`` read and call."""
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    epoch_loop = trainer.fit_loop.epoch_loop
    assert isinstance(getattr(type(epoch_loop), "restarted_on_train_batch_end", None), property)
    assert callable(epoch_loop._should_check_val_fx)
    assert hasattr(trainer.fit_loop, "_data_fetcher")
    assert callable(epoch_loop.val_loop.run) and hasattr(epoch_loop.val_loop, "restarting")
    assert hasattr(trainer._logger_connector, "_first_loop_iter")
    source = inspect.getsource(type(epoch_loop).advance)  # what the resumed loop does in its place
    assert "increment_progress_to_evaluation_end" in source and "restarted_on_last" in source


def test_the_rich_bar_still_builds_its_train_description_where_distilkit_overrides_it():
    from lightning.pytorch.callbacks import RichProgressBar

    name = lightning_internals.RICH_TRAIN_DESCRIPTION
    assert callable(getattr(RichProgressBar, name))
    assert f"self.{name}(" in inspect.getsource(RichProgressBar)
