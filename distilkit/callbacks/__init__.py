"""Callbacks that steer or watch a run: the curriculum, the learning curve, throughput, samples, the
progress bar, and the predictions writer."""

from distilkit.callbacks.curriculum import CurriculumCallback, CurriculumState, Stage
from distilkit.callbacks.learning_curve import LearningCurve
from distilkit.callbacks.predictions import PredictionWriter
from distilkit.callbacks.progress import DistilProgressBar, PositionsProgressBar
from distilkit.callbacks.samples import SampleTable
from distilkit.callbacks.throughput import TokenThroughput, batch_tokens

__all__ = [
    "CurriculumCallback",
    "CurriculumState",
    "DistilProgressBar",
    "PositionsProgressBar",
    "LearningCurve",
    "PredictionWriter",
    "SampleTable",
    "Stage",
    "TokenThroughput",
    "batch_tokens",
]
