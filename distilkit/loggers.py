"""The loggers' import path before distilkit 0.2, kept for the ``config.yaml`` files earlier runs saved
(``class_path: distilkit.loggers.CSVLogger``). New code imports :mod:`distilkit.run.loggers`."""

from distilkit.run.loggers import CSVLogger, WandbLogger

__all__ = ["CSVLogger", "WandbLogger"]
