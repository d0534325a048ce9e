"""A run's books: its directory, loggers, atomic checkpoint writes, signals, and the state a checkpoint
carries besides the weights (:class:`RunState`)."""

from distilkit.run.checkpoint_io import AtomicCheckpointIO
from distilkit.run.loggers import CSVLogger, WandbLogger
from distilkit.run.signals import CheckpointAtEnd, CheckpointOnInterrupt, CheckpointOnSigterm
from distilkit.run.state import RunState
from distilkit.run.tokenizers import TokenizerCheck

__all__ = [
    "AtomicCheckpointIO",
    "CSVLogger",
    "CheckpointAtEnd",
    "CheckpointOnInterrupt",
    "CheckpointOnSigterm",
    "RunState",
    "TokenizerCheck",
    "WandbLogger",
]
