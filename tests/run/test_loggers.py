"""metrics.csv keeps one row per step and metric set: a row logged again at the same step (written before a
checkpoint, then by Lightning) replaces the first, so a value logged in between is not lost or doubled."""

from __future__ import annotations

import csv

from distilkit.run.loggers import CSVLogger


def rows(logger: CSVLogger) -> list[dict[str, str]]:
    logger.save()
    with open(logger.metrics_file, newline="") as file:
        return list(csv.DictReader(file))


def test_a_row_logged_again_at_its_step_replaces_the_first_one_even_once_written(tmp_path):
    """Issue 21.7: on-policy logged its final training row twice, once with the previous step's
    generation_share (the row written before the end-of-run checkpoint) and once complete."""
    logger = CSVLogger(save_dir=str(tmp_path))
    logger.log_metrics({"train/loss": 2.0, "train/generation_share": 0.1}, step=3)
    logger.log_metrics({"train/loss": 1.0, "train/generation_share": 0.1}, step=4)
    logger.save()  # flushed to disk, as before a checkpoint
    logger.log_metrics({"train/loss": 1.0, "train/generation_share": 0.4}, step=4)
    logger.log_metrics(
        {"train/loss": 1.0, "train/generation_share": 0.4}, step=4
    )  # the same again: kept once
    logger.log_metrics({"val/loss": 3.0}, step=4)  # another set of metrics at that step: a row of its own
    written = rows(logger)
    assert [(r["step"], r["train/generation_share"], r["val/loss"]) for r in written] == [
        ("3", "0.1", ""),
        ("4", "0.4", ""),
        ("4", "", "3.0"),
    ]
