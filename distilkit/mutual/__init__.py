"""Mutual and online distillation: a cohort of peers that learn from the labels and from each other."""

from distilkit.mutual.cohort import MutualDistillationModule
from distilkit.mutual.optimizers import PeerOptimizers, PeerSchedulers

__all__ = ["MutualDistillationModule", "PeerOptimizers", "PeerSchedulers"]
