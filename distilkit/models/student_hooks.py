"""The Lightning hooks of a student that is more than plain weights: cut from the teacher, or trained
through LoRA adapters. A mixin of the distillation modules, so that ``module.py`` stays one idea.

* ``student: {from_teacher: {...}}`` (:mod:`distilkit.models.from_teacher`): a cut that ranks on data is
  finished in :meth:`StudentHooks.setup`, on the first batches of the run's training data; a checkpoint
  loaded afterwards replaces it (:meth:`StudentHooks.on_load_checkpoint`).
* ``student_adapter: {...}`` (:mod:`distilkit.models.adapters`): only the adapters are checkpointed; the
  frozen base, like the teacher, comes back from its spec on load, and must hash to the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from distilkit.models.adapters import attach_adapter, check_adapters, frozen_base
from distilkit.models.checkpoint import model_configs
from distilkit.models.from_teacher import StudentCut
from distilkit.models.loading import ModelSpec, load_student_and_teacher


class StudentHooks:
    """A mixin placed before ``L.LightningModule``: loads ``student`` and ``teacher``
    (:meth:`load_models`) and keeps checkpoints free of what their specs rebuild on load."""

    student: nn.Module
    teacher: nn.Module | None  # the teacher model, when one runs here
    teacher_source: nn.Module | None  # everything of the teacher, rebuilt from its spec on load
    vocab_size: int
    student_cut: StudentCut | None = None
    trainer: Any

    def load_models(
        self,
        student: ModelSpec,
        teacher: ModelSpec | None,
        student_adapter: Mapping[str, Any] | None = None,
        **loading: Any,
    ) -> nn.Module | None:
        """Set ``student`` (with its adapters if any) and ``vocab_size``, and return the teacher model, loaded
        from ``teacher`` (``loading``: the keyword arguments of
        :func:`~distilkit.models.loading.load_student_and_teacher`)."""
        self.student_cut = StudentCut.parse(student)  # kept: a cut may finish in setup
        self.student, teacher_model, self.vocab_size = load_student_and_teacher(
            self.student_cut or student, teacher, **loading
        )
        self.student = attach_adapter(self.student, student_adapter, base=student)
        return teacher_model

    def setup(self, stage: str) -> None:
        """Finish a cut that ranks on data, on the run's training data (once, whatever the stage); a run
        that loads a checkpoint takes its student from there instead (:meth:`on_load_checkpoint`), so the
        calibration passes are not paid for a student about to be replaced."""
        cut = self.student_cut
        if cut is None or not cut.pending or self.trainer.ckpt_path is not None:  # type: ignore[attr-defined]
            return
        assert self.teacher is not None  # a cut is built from the teacher
        self.student = cut.finish_for(self.teacher, self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint's weights load: a cut student takes the checkpoint's config (and the place of
        any pending cut); a LoRA student must have the base and settings its adapters were trained with."""
        if self.student_cut is not None:
            self.student = self.student_cut.restored(self.student, model_configs(checkpoint).get("student"))
        check_adapters(self.student, checkpoint, "student")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The module's state without what the specs rebuild on load: the teacher, a LoRA student's base."""
        state: dict[str, Any] = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        for key in self.rebuilt_on_load(kwargs.get("prefix", "")):
            state.pop(key, None)
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state saved by :meth:`state_dict`; what it left out keeps its weights (strict otherwise)."""
        full = {**self.rebuilt_on_load(""), **state_dict}
        return super().load_state_dict(full, strict=strict, assign=assign)  # type: ignore[misc]

    def rebuilt_on_load(self, prefix: str) -> dict[str, Tensor]:
        """The state entries checkpoints leave out, by key: the teacher's and a LoRA student's frozen base."""
        source = self.teacher_source
        teacher = {} if source is None else source.state_dict(prefix=f"{prefix}teacher_source.")
        return teacher | {f"{prefix}student.{k}": v for k, v in frozen_base(self.student).items()}
