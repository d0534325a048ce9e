"""From what a recipe says to a teacher source: ``model.teacher`` (a model, or ``{server: URL, model: NAME,
top_k: K}``: a teacher behind an inference server) or ``model.teacher_cache``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distilkit.errors import ConfigError
from distilkit.teachers.base import TeacherSource
from distilkit.teachers.cache import FIELD as CACHE_FIELD
from distilkit.teachers.cache import CachedTeacher
from distilkit.teachers.live import LiveTeacher
from distilkit.teachers.served import ServedTeacherSource, is_served


def open_teacher(
    spec: Any, model: nn.Module | None, cache: str | Path | None, vocab_size: int
) -> TeacherSource | None:
    """The teacher source a module's settings describe.

    Args:
        spec: ``model.teacher`` as given (a directory, a config mapping, a module, a served teacher's
            mapping, or None).
        model: the teacher model loaded from ``spec`` (None without one, and for a served teacher).
        cache: ``model.teacher_cache``: a directory written by ``distilkit cache``, or None.
        vocab_size: the logit width the losses compare.

    Returns:
        A :class:`LiveTeacher`, a :class:`CachedTeacher`, a :class:`ServedTeacherSource`, or None (no
        teacher: plain language-model training).
    """
    if cache is not None and (model is not None or is_served(spec)):
        raise ConfigError(
            CACHE_FIELD,
            str(cache),
            "is given together with model.teacher (a cache replaces the teacher)",
            "set model.init_args.teacher: null to train from the cache, or drop teacher_cache",
        )
    if cache is not None:
        return CachedTeacher(cache)
    if is_served(spec):
        return ServedTeacherSource.from_spec(spec, vocab_size)
    return None if model is None else LiveTeacher(model, vocab_size, spec=spec)
