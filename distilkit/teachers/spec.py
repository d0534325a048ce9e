"""From what a recipe says to a teacher source: ``model.teacher`` (a model, or ``{server: URL, model: NAME,
top_k: K}``: a teacher behind an inference server), ``model.teacher_cache``, or ``model.teachers`` (several,
routed or mixed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from distilkit.errors import ConfigError
from distilkit.teachers.base import TeacherSource
from distilkit.teachers.cache import FIELD as CACHE_FIELD
from distilkit.teachers.cache import CachedTeacher
from distilkit.teachers.live import LiveTeacher
from distilkit.teachers.served import ServedTeacherSource, is_served
from distilkit.teachers.several import Unrouted, open_several


def open_teacher(
    spec: Any,
    model: nn.Module | None,
    cache: str | Path | None,
    vocab_size: int,
    *,
    teachers: Mapping[str, Any] | None = None,
    route_by: str | None = None,
    mix: Mapping[str, float] | None = None,
    unrouted: Unrouted = "error",
    load: Callable[[Any, str], nn.Module] | None = None,
) -> TeacherSource | None:
    """The teacher source a module's settings describe.

    Args:
        spec: ``model.teacher`` as given (a directory, a config mapping, a module, a served teacher's
            mapping, or None).
        model: the teacher model loaded from ``spec`` (None without one, and for a served teacher).
        cache: ``model.teacher_cache``: a directory written by ``distilkit cache``, or None.
        vocab_size: the logit width the losses compare.
        teachers: ``model.teachers``: several teachers by name (:mod:`distilkit.teachers.several`), in place
            of ``teacher`` and ``teacher_cache``; combined by ``route_by`` or ``mix`` (with ``unrouted``).
        load: ``(spec, field) -> model``: loads the teachers' models (a
            :class:`~distilkit.teachers.several.TeacherLoader`).

    Returns:
        A :class:`LiveTeacher`, a :class:`CachedTeacher`, a :class:`ServedTeacherSource`, a
        :class:`~distilkit.teachers.several.SeveralTeachers`, or None (no teacher: plain language-model
        training).
    """
    if teachers is not None:
        given = [
            f
            for f, value in (("model.teacher", model if model is not None else spec), (CACHE_FIELD, cache))
            if value is not None
        ]
        if given:
            raise ConfigError(
                "model.teachers", list(teachers), f"is given together with {given[0]}",
                f"set {given[0]}: null (the teachers replace it), or drop model.teachers",
            )  # fmt: skip
        if load is None:
            raise ValueError("open_teacher needs load= to load model.teachers")
        return open_several(teachers, vocab_size, load, route_by=route_by, mix=mix, unrouted=unrouted)
    alone = (("model.route_by", route_by), ("model.mix", mix), ("model.unrouted", unrouted != "error"))
    for field, value in alone:
        if value not in (None, False):
            raise ConfigError(field, value, "is for model.teachers", "give model.teachers, or drop it")
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
