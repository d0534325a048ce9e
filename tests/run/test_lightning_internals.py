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
