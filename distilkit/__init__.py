"""distilkit: knowledge distillation for GPT-style causal language models, on PyTorch Lightning."""

from distilkit.curriculum import CurriculumCallback, Stage
from distilkit.data import TextDataModule
from distilkit.losses import (
    DistillationLoss,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TVDLoss,
)
from distilkit.metrics import DistillationKL, TokenPerplexity, TopKAgreement
from distilkit.module import DistillationModule

__version__ = "0.1.0.dev0"

__all__ = [
    "CurriculumCallback",
    "DistillationKL",
    "DistillationLoss",
    "DistillationModule",
    "ForwardKLLoss",
    "GeneralizedJSDLoss",
    "LogitMSELoss",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "Stage",
    "SymmetricKLLoss",
    "TVDLoss",
    "TextDataModule",
    "TokenPerplexity",
    "TopKAgreement",
]
