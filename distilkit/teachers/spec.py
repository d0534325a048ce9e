"""From what a recipe says to a teacher source: ``model.teacher`` (a model, with ``model.teacher_tokenizer``;
or ``{server: URL, model: NAME, top_k: K}``: a teacher behind an inference server), ``model.teacher_cache``,
or ``model.teachers`` (several, routed or mixed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, overload

from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distilkit.data.gguf import gguf_tokenizer, is_gguf
from distilkit.data.tokenizer import check_same_vocabulary, same_vocabulary
from distilkit.errors import ConfigError
from distilkit.models.from_teacher import StudentCut
from distilkit.models.loading import load_causal_lm, parse_dtype, tokenizer_of
from distilkit.teachers.aligned import AlignedTeacher
from distilkit.teachers.base import TeacherSource
from distilkit.teachers.cache import FIELD as CACHE_FIELD
from distilkit.teachers.cache import CachedTeacher
from distilkit.teachers.live import LiveTeacher
from distilkit.teachers.served import ServedTeacherSource, is_served
from distilkit.teachers.several import MixBy, Unrouted, open_several

TOKENIZER_FIELD = "model.teacher_tokenizer"


class TeacherTokenizer(NamedTuple):
    """The tokenizer a teacher reads its text with.

    Attributes:
        tokenizer: ``model.teacher_tokenizer`` when given, else the one saved with the teacher directory or
            GGUF file; None when the teacher reads the data's (a config mapping, a module, a directory without
            tokenizer files).
        apart: the tokenizer is known, before the data is seen, not to be the data's (its size differs from
            ``vocab_size``): the teacher is loaded with its own vocabulary and taught through an
            :class:`~distilkit.teachers.aligned.AlignedTeacher`. A tokenizer of the data's size that differs
            from it is found when the run sets up (:func:`for_data`).
    """

    tokenizer: PreTrainedTokenizerBase | None
    apart: bool

    @classmethod
    def resolve(
        cls, teacher: Any, given: str | None, cache: str | Path | None, vocab_size: int | None
    ) -> TeacherTokenizer:
        """The teacher's tokenizer from ``model.teacher`` (``teacher``), ``model.teacher_tokenizer``
        (``given``: a tokenizer or model directory, or a GGUF file), ``model.teacher_cache`` and the data's
        ``vocab_size``."""
        if given is not None and (teacher is None or cache is not None):
            raise ConfigError(
                TOKENIZER_FIELD,
                given,
                "names the tokenizer of a teacher model, but "
                + ("there is none" if teacher is None else "a teacher cache replaces it"),
                f"drop {TOKENIZER_FIELD}",
            )
        if given is not None and is_served(teacher):
            raise ConfigError(
                TOKENIZER_FIELD,
                given,
                "names a tokenizer of its own, but a served teacher (model.teacher: {server: ...}) is sent "
                "the data's token ids and answers top-k over the data's vocabulary",
                f"drop {TOKENIZER_FIELD} and serve a model that reads data.tokenizer, or load the teacher "
                "itself (model.teacher: DIR or FILE.gguf) to distil across tokenizers",
            )
        own = tokenizer_of(teacher, "model.teacher") if isinstance(teacher, (str, os.PathLike)) else None
        named = None if given is None else _load_tokenizer(given)
        tokenizer = own if named is None else named
        if named is not None and own is not None:  # one model, one tokenizer
            try:
                check_same_vocabulary(
                    own, f"model.teacher ({teacher})", named, f"{TOKENIZER_FIELD} ({given})"
                )
            except ConfigError as err:
                raise ConfigError(
                    TOKENIZER_FIELD, given, f"{err.value} {err.problem}", f"drop {TOKENIZER_FIELD}"
                ) from err
        apart = tokenizer is not None and vocab_size is not None and len(tokenizer) != vocab_size
        return cls(tokenizer, apart)

    def load(self, teacher: Any, student: Any, dtype: str) -> nn.Module:
        """The teacher model, loaded with its own vocabulary (a config mapping filled from the tokenizer)."""
        assert self.tokenizer is not None
        if StudentCut.parse(student) is not None:
            raise ConfigError(
                "model.student",
                "from_teacher",
                "cuts the student from the teacher, whose tokenizer is not data.tokenizer",
                "give the student a config mapping or a directory, or the data the teacher's tokenizer",
            )
        eos = self.tokenizer.eos_token_id
        defaults = {"vocab_size": len(self.tokenizer), "bos_token_id": eos, "eos_token_id": eos}
        model = load_causal_lm(
            teacher, field="model.teacher", dtype=parse_dtype("model.teacher_dtype", dtype), defaults=defaults
        )
        return model.requires_grad_(False).eval()


def open_teacher(
    spec: Any,
    model: nn.Module | None,
    cache: str | Path | None,
    vocab_size: int,
    tokens: TeacherTokenizer | None = None,
    *,
    teachers: Mapping[str, Any] | None = None,
    route_by: str | None = None,
    mix: Mapping[str, float] | None = None,
    unrouted: Unrouted = "error",
    mix_by: MixBy = "weights",
    load: Callable[[Any, str], nn.Module] | None = None,
) -> TeacherSource | None:
    """The teacher source a module's settings describe.

    Args:
        spec: ``model.teacher`` as given (a directory, a config mapping, a module, a served teacher's
            mapping, or None).
        model: the teacher model loaded from ``spec`` (None without one, and for a served teacher).
        cache: ``model.teacher_cache``: a directory written by ``distilkit cache``, or None.
        vocab_size: the logit width the losses compare.
        tokens: the teacher's tokenizer (:class:`TeacherTokenizer`); None: the data's.
        teachers: ``model.teachers``: several teachers by name (:mod:`distilkit.teachers.several`), in place
            of ``teacher`` and ``teacher_cache``; combined by ``route_by`` or ``mix`` (with ``unrouted`` or
            ``mix_by``).
        load: ``(spec, field) -> model``: loads the teachers' models (a
            :class:`~distilkit.teachers.several.TeacherLoader`).

    Returns:
        A :class:`LiveTeacher`, an :class:`AlignedTeacher` (a tokenizer ``apart`` from the data's), a
        :class:`CachedTeacher`, a :class:`ServedTeacherSource`, a
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
        return open_several(
            teachers, vocab_size, load, route_by=route_by, mix=mix, unrouted=unrouted, mix_by=mix_by
        )
    alone: list[tuple[str, Any]] = [("model.route_by", route_by), ("model.mix", mix)]
    alone += [("model.unrouted", None if unrouted == "error" else unrouted)]
    alone += [("model.mix_by", None if mix_by == "weights" else mix_by)]
    for field, value in alone:
        if value is not None:
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
    if model is None:
        return None
    if tokens is not None and tokens.apart:
        assert tokens.tokenizer is not None
        return AlignedTeacher(model, tokens.tokenizer, spec=spec)
    return LiveTeacher(model, vocab_size, spec=spec, tokenizer=None if tokens is None else tokens.tokenizer)


@overload
def for_data(source: TeacherSource, tokenizer: PreTrainedTokenizerBase | None) -> TeacherSource: ...
@overload
def for_data(source: None, tokenizer: PreTrainedTokenizerBase | None) -> None: ...
def for_data(source: TeacherSource | None, tokenizer: PreTrainedTokenizerBase | None) -> TeacherSource | None:
    """The source that teaches data tokenized by ``tokenizer``: a live teacher whose known tokenizer is
    another one (of the same size: another size is known when the module is built) becomes an
    :class:`AlignedTeacher` of the same model; any other source is returned as it is."""
    if not isinstance(source, LiveTeacher) or source.tokenizer is None or tokenizer is None:
        return source
    if same_vocabulary(source.tokenizer, tokenizer):
        return source
    return AlignedTeacher(source.teacher, source.tokenizer, spec=source.spec, field=source.field)


def _load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """``model.teacher_tokenizer``: a tokenizer (or model) directory, or a GGUF file's tokenizer."""
    if is_gguf(spec):
        return gguf_tokenizer(spec, field=TOKENIZER_FIELD)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(
            TOKENIZER_FIELD,
            spec,
            "is not a directory",
            "give a tokenizer or model directory, or a .gguf file",
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            TOKENIZER_FIELD, spec, f"holds no loadable tokenizer ({err})", "point at a tokenizer directory"
        ) from err
