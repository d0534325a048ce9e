"""``distilkit prune``: a student cut from the teacher, written as a Hugging Face model directory (with the
teacher's tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads and a recipe's ``student:`` names.

Either from a recipe whose student is ``{from_teacher: {...}}`` (``--config R.yaml``: its teacher, its
data and its cut, as a one-process ``distilkit fit`` would cut; under DDP a fit calibrates on rank 0's
share of the first batches), or from explicit arguments; explicit arguments
override the recipe's. The cut itself is :class:`~distilkit.models.from_teacher.StudentCut`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from jsonargparse import ArgumentParser

from distilkit.data.progress import LONG_LOAD_BYTES, bars_if
from distilkit.data.verified import as_command, remember_manifest, shared_memo, write_manifest
from distilkit.errors import ConfigError, RunInterrupted, fields_as_typed
from distilkit.files import atomic_directory, refuse_existing
from distilkit.models.from_teacher import KEY, StudentCut, calibration_data
from distilkit.models.loading import load_student_and_teacher, parse_dtype, tokenizer_of
from distilkit.models.pruning import PruneReport


def prune_student(
    output_dir: str | Path,
    config: str | Path | None = None,
    teacher: str | None = None,
    targets: dict[str, int] | None = None,
    layers: list[int] | None = None,
    layer_ranking: str | None = None,
    importance: str | None = None,
    calibration_batches: int | None = None,
    data_files: str | list[str] | None = None,
    block_size: int | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> tuple[Path, PruneReport]:
    """Cut a student and write it to ``output_dir`` (arguments as :func:`prune`).

    Returns:
        ``output_dir`` and the report of the cut.
    """
    out = Path(output_dir)
    refuse_existing(out, overwrite=overwrite, field="output_dir")
    torch_dtype = parse_dtype("dtype", dtype)
    options: dict[str, Any] = {"config": config, "teacher": teacher, "targets": targets, "layers": layers}
    options |= {"layer_ranking": layer_ranking, "importance": importance, "data_files": data_files}
    options |= {
        "calibration_batches": calibration_batches,
        "block_size": block_size,
        "batch_size": batch_size,
    }
    command = as_command("prune", output_dir=output_dir, **options)
    recipe = _read_recipe(config) if config is not None else {}
    model_args = (recipe.get("model") or {}).get("init_args") or {}
    teacher_spec = teacher if teacher is not None else model_args.get("teacher")
    if teacher_spec is None:
        raise ConfigError(
            "teacher", None, "there is no teacher to cut from", "give --teacher DIR or --config R"
        )
    explicit: dict[str, Any] = {"layers": layers, "layer_ranking": layer_ranking, "importance": importance}
    explicit["calibration_batches"] = calibration_batches
    body = {**_recipe_cut(model_args, config, targets), **(targets or {})}
    body |= {k: v for k, v in explicit.items() if v is not None}
    given = {"teacher": teacher, "targets": targets, **explicit, "data_files": data_files}
    typed = _typed({**given, "block_size": block_size, "batch_size": batch_size})
    with fields_as_typed(typed):
        cut = StudentCut.parse({KEY: body})
    assert cut is not None
    if isinstance(recipe.get("seed_everything"), int):  # a config-mapping teacher, built as fit builds it
        L.seed_everything(recipe["seed_everything"], verbose=False)
    with fields_as_typed(typed):  # errors name the options the user typed, not a recipe's fields
        datamodule = _datamodule(recipe, teacher_spec, data_files, block_size, batch_size)
        sizes = {} if datamodule is None else {"vocab_size": datamodule.vocab_size}
        if datamodule is not None:
            sizes |= {"block_size": datamodule.block_size, "eos_token_id": datamodule.eos_token_id}
        student: Any
        student, teacher_model, _ = load_student_and_teacher(
            cut, teacher_spec, teacher_dtype=model_args.get("teacher_dtype", "float32"), **sizes
        )
        if cut.pending:
            if datamodule is None:
                raise ConfigError(
                    "data_files",
                    None,
                    "this cut ranks blocks or width on calibration data, and none was given",
                    "give --data_files (e.g. builtin:python-reference), or --layers, --importance magnitude",
                )
            datamodule.setup("fit")
            batches = calibration_data(datamodule, cut.calibration_batches, cut.field)
            student = cut.finish(teacher_model, batches)
    assert cut.report is not None
    tokenizer = datamodule.tokenizer if datamodule is not None else tokenizer_of(teacher_spec, "teacher")
    with atomic_directory(out, overwrite=overwrite) as staging, bars_if(_bytes(student) >= LONG_LOAD_BYTES):
        student.to(torch_dtype).eval().save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        manifest = write_manifest(staging, command=command, overwrite=True)
    remember_manifest(out, manifest, shared_memo())  # read back by distilkit: checked by its hashes
    return out, cut.report


def prune(
    output_dir: str,
    config: str | None = None,
    teacher: str | None = None,
    targets: dict[str, int] | None = None,
    layers: list[int] | None = None,
    layer_ranking: Literal["influence", "loss"] | None = None,
    importance: Literal["activation", "magnitude"] | None = None,
    calibration_batches: int | None = None,
    data_files: str | list[str] | None = None,
    block_size: int | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> None:
    """Cut a student from the teacher and write it as a Hugging Face model directory with the tokenizer.

    Prints the parameter counts before and after and the ranking it used.

    Args:
        output_dir: the directory to write (refused if it exists and is not empty, unless ``--overwrite``).
        config: a recipe whose ``model.init_args.student`` is ``{from_teacher: {...}}``: its teacher, data
            and cut, as ``distilkit fit`` would cut them (the arguments below override them).
        teacher: the teacher's Hugging Face directory (or hub name).
        targets: the student's sizes in the teacher's config field names, e.g. ``{n_layer: 2, n_embd: 128}``.
        layers: teacher blocks to keep, e.g. ``[0, 2]`` (default: ranked on the data).
        layer_ranking: how blocks are ranked: ``influence`` (block influence, 1 − cos(input, output)) or
            ``loss`` (dropped one at a time by the teacher's next-token loss without them).
        importance: how heads, MLP channels and hidden channels are ranked: ``activation`` (on the data,
            the default) or ``magnitude`` (weight norms, no data).
        calibration_batches: how many training batches importance is measured on (default 8).
        data_files: calibration text (paths or ``builtin:python-reference``), tokenized with the teacher's
            tokenizer; with ``--config`` it replaces the recipe's ``train_files``.
        block_size: tokens per calibration example (default 128; with ``--config``, the recipe's).
        batch_size: examples per calibration batch (default 16; with ``--config``, the recipe's, which a fit
            of the recipe calibrates on: another batch size ranks on other blocks, said in one line).
        dtype: dtype of the saved weights: ``float32``, ``bfloat16`` or ``float16``.
        overwrite: replace an existing ``output_dir``.
    """
    try:
        out, report = prune_student(
            output_dir, config, teacher, targets, layers, layer_ranking, importance, calibration_batches,
            data_files, block_size, batch_size, dtype, overwrite,
        )  # fmt: skip
    except RunInterrupted as err:
        raise RunInterrupted(f"{err}; nothing was written (a cut is one job: run it again)") from err
    print("\n".join(report.lines()))
    print(f"wrote {out}; train it as a recipe's student: model.init_args.student: {out}")


#: Where ``prune``'s options land, by the field an error would name otherwise (the most specific first).
_OPTIONS = {
    **{f"model.student.{KEY}.{name}": name for name in ("layers", "layer_ranking", "importance")},
    f"model.student.{KEY}.calibration_batches": "calibration_batches",
    f"model.student.{KEY}": "targets",
    "model.teacher": "teacher",
    "data.train_files": "data_files",
    "data.block_size": "block_size",
    "data.batch_size": "batch_size",
}


def _typed(given: dict[str, Any]) -> dict[str, str]:
    """The fields an error may name, renamed to the options of ``given`` (prune's arguments) that were
    typed."""
    return {field: option for field, option in _OPTIONS.items() if given.get(option) is not None}


def _read_recipe(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("config", str(path), "does not exist", "give a recipe YAML file")
    recipe = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(recipe, dict):
        raise ConfigError("config", str(path), "is not a recipe (a YAML mapping)", "give a recipe YAML file")
    return recipe


def _recipe_cut(model_args: dict[str, Any], config: Any, targets: dict[str, int] | None) -> dict[str, Any]:
    """The recipe's ``from_teacher`` mapping (empty without a recipe, or when ``targets`` are given)."""
    student = model_args.get("student")
    if isinstance(student, dict) and isinstance(student.get(KEY), dict):
        return dict(student[KEY])
    if config is not None and targets is None:
        raise ConfigError(
            "config",
            str(config),
            f"its student is not cut from the teacher (model.init_args.student: {{{KEY}: ...}})",
            "use a recipe such as recipes/pruned.yaml, or give --targets",
        )
    return {}


def _datamodule(
    recipe: dict[str, Any],
    teacher: Any,
    data_files: str | list[str] | None,
    block_size: int | None,
    batch_size: int | None,
) -> Any:
    """The recipe's data module (``data_files``, ``block_size`` and ``batch_size`` replacing its own when
    given), a text data module of ``data_files`` with the teacher's tokenizer, or None without either."""
    given = {"train_files": data_files, "block_size": block_size, "batch_size": batch_size}
    given = {key: value for key, value in given.items() if value is not None}
    if recipe.get("data"):
        data = dict(recipe["data"])
        own = dict(data.get("init_args") or {})
        if "batch_size" in given and given["batch_size"] != own.get("batch_size", given["batch_size"]):
            warnings.warn(
                f"batch_size={given['batch_size']}: the recipe's fit calibrates on batches of "
                f"{own['batch_size']} (data.batch_size), so this cut may keep other blocks than its fit's",
                stacklevel=2,
            )
        data["init_args"] = {**own, **given}
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
        return parser.instantiate_classes(parser.parse_object({"data": data}))["data"]
    if data_files is None:
        return None
    from distilkit.data import TextDataModule

    return TextDataModule(
        data_files, tokenizer=str(teacher), block_size=block_size or 128, batch_size=batch_size or 16
    )


def _bytes(model: Any) -> int:
    """Bytes of a model's parameters (a save shows progress only when it is large)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
