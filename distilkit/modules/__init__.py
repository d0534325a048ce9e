"""The distillation modules and their one base: :class:`DistillationModule` (a student and a teacher),
:class:`OnPolicyDistillationModule` (GKD: also on the student's own samples),
:class:`MutualDistillationModule` (a cohort of peers), all on :class:`DistillationBase`."""

from distilkit.modules.base import DistillationBase
from distilkit.modules.distillation import DistillationModule
from distilkit.modules.mutual import MutualDistillationModule
from distilkit.modules.on_policy import OnPolicyDistillationModule
from distilkit.modules.peer_optimizers import PeerOptimizers, PeerSchedulers

__all__ = [
    "DistillationBase",
    "DistillationModule",
    "MutualDistillationModule",
    "OnPolicyDistillationModule",
    "PeerOptimizers",
    "PeerSchedulers",
]
