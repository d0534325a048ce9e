"""distilkit: knowledge distillation for GPT-style causal language models, on PyTorch Lightning.

The layers, lowest first (each imports only from those below it; ``tests/test_architecture.py`` checks):
``errors``, ``files``, ``batch`` -> ``data/`` -> ``models/`` -> ``losses/``, ``metrics`` -> ``guards``,
``module`` -> ``run/`` -> ``callbacks/`` -> ``commands/`` -> ``cli``.
"""

from distilkit.callbacks import CurriculumCallback, Stage
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
from distilkit.mutual import MutualDistillationModule
from distilkit.on_policy import OnPolicyDistillationModule

__version__ = "0.2.0.dev0"

__all__ = [
    "CurriculumCallback",
    "DistillationKL",
    "DistillationLoss",
    "DistillationModule",
    "ForwardKLLoss",
    "GeneralizedJSDLoss",
    "LogitMSELoss",
    "MutualDistillationModule",
    "OnPolicyDistillationModule",
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
