"""Pluggable distillation losses. Choose one in YAML with ``class_path: distilkit.losses.<Name>``."""

from distilkit.losses.base import DistillationLoss
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

__all__ = [
    "DistillationLoss",
    "ForwardKLLoss",
    "GeneralizedJSDLoss",
    "LogitMSELoss",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "SymmetricKLLoss",
    "TVDLoss",
]
