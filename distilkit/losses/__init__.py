"""Pluggable distillation losses. Choose one in YAML with ``class_path: distilkit.losses.<Name>``."""

from distilkit.losses.base import DistillationLoss
from distilkit.losses.cross_tokenizer import GOLDLoss, ULDLoss
from distilkit.losses.divergences import (
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TVDLoss,
)
from distilkit.losses.hidden import HiddenStateLoss
from distilkit.losses.sparse import SparseTargets

__all__ = [
    "DistillationLoss",
    "ForwardKLLoss",
    "GOLDLoss",
    "GeneralizedJSDLoss",
    "HiddenStateLoss",
    "LogitMSELoss",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "SparseTargets",
    "SymmetricKLLoss",
    "TVDLoss",
    "ULDLoss",
]
