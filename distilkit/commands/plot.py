"""``distilkit plot RUN_DIR``: redraw a run's ``learning_curve.png`` from its ``metrics.csv``."""

from __future__ import annotations

from pathlib import Path

import yaml

from distilkit.callbacks.curriculum import CurriculumCallback
from distilkit.callbacks.learning_curve import PNG_NAME, plot_learning_curve
from distilkit.errors import ConfigError
from distilkit.run.directory import class_from_path


def plot(run_dir: str) -> Path:
    """Redraw RUN_DIR/learning_curve.png from RUN_DIR/metrics.csv (curriculum stages named from its config).

    Args:
        run_dir: the directory of a distilkit run (``trainer.default_root_dir``).
    """
    root = Path(run_dir)
    metrics_csv = root / "metrics.csv"
    if not metrics_csv.is_file():
        raise ConfigError(
            "run_dir", str(root), "holds no metrics.csv", "give the directory of a distilkit run"
        )
    out = plot_learning_curve(metrics_csv, root / PNG_NAME, stage_names(root / "config.yaml"))
    print(f"wrote {out}")
    return out


def stage_names(config_path: Path) -> list[str]:
    """The names of the curriculum stages in a run's ``config.yaml`` (empty without a curriculum)."""
    if not config_path.is_file():
        return []
    config = yaml.safe_load(config_path.read_text()) or {}
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        cls = class_from_path(str(callback.get("class_path", ""))) if isinstance(callback, dict) else None
        if cls is not None and issubclass(cls, CurriculumCallback):
            return [stage.get("name", "") for stage in callback.get("init_args", {}).get("stages", [])]
    return []
