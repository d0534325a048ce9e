"""distilkit: knowledge distillation for GPT-style causal language models, on PyTorch Lightning.

The layers, lowest first (each imports only from its own and those below it; ``tests/test_architecture.py``
checks): ``batch.py``, ``errors.py``, ``files.py`` -> ``data/`` -> ``models/`` -> ``losses/``, ``metrics.py``
-> ``teachers/`` -> ``run/`` -> ``modules/`` -> ``callbacks/`` -> ``commands/`` -> ``cli.py``.
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
from distilkit.modules import DistillationModule, MutualDistillationModule, OnPolicyDistillationModule

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
