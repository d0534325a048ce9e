"""Cutting a student from the teacher: depth (whole blocks) and width (heads, MLP neurons, embedding
channels), ranked by measured importance (Minitron) or chosen by hand (DistilBERT's every other layer)."""

from distilkit.models.pruning.cut import PruneReport, cut_from_teacher
from distilkit.models.pruning.layouts import supported_model_types

__all__ = ["PruneReport", "cut_from_teacher", "supported_model_types"]
