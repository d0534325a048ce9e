"""The teacher's side of a loss: one protocol (:class:`TeacherSource`) and one file per kind of teacher, a
live model (:class:`LiveTeacher`), an offline teacher cache (:class:`CachedTeacher`), a mixture of models
(:class:`PeerMixture`, what each peer of a cohort learns from), several teachers routed by the data or
mixed (:class:`SeveralTeachers`)."""

from distilkit.teachers.base import (
    Split,
    TargetKind,
    TeacherSource,
    Teaching,
    describe_teacher,
    same_teacher,
)
from distilkit.teachers.cache import CachedTeacher
from distilkit.teachers.live import LiveTeacher, model_identity
from distilkit.teachers.mixture import PeerMixture
from distilkit.teachers.several import SeveralTeachers, TeacherLoader
from distilkit.teachers.spec import open_teacher

__all__ = [
    "CachedTeacher",
    "LiveTeacher",
    "PeerMixture",
    "SeveralTeachers",
    "Split",
    "TargetKind",
    "TeacherLoader",
    "TeacherSource",
    "Teaching",
    "describe_teacher",
    "model_identity",
    "open_teacher",
    "same_teacher",
]
