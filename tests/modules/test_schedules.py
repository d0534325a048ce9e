"""Schedules follow the run: a length left out is the run's optimizer steps; an explicit one that differs is
refused; torch's OneCycleLR never divides by zero in a short run."""

from __future__ import annotations

import csv
import functools
import math

import pytest
import torch
from helpers import fit_run, tiny_recipe

from distilkit.modules.schedules import CosineAnnealingLR, build_scheduler

ONE_CYCLE = {
    "class_path": "torch.optim.lr_scheduler.OneCycleLR",
    "init_args": {"max_lr": 0.01, "pct_start": 0.3},
}


def _lrs(run_dir) -> list[float]:
    with (run_dir / "metrics.csv").open() as file:
        return [float(row["train/lr"]) for row in csv.DictReader(file) if row.get("train/lr")]


@pytest.mark.parametrize("max_steps", [7, 12])
def test_a_recipe_without_a_length_runs_its_one_cycle_over_exactly_the_run(
    tmp_path, small_corpus, tokenizer_dir, cache_dir, max_steps
):
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tokenizer_dir, cache_dir, val_check_interval=100)
    run_dir = tmp_path / "run"
    fit_run(
        recipe, run_dir, "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches", "0",
        "--model.init_args.lr_scheduler", str(ONE_CYCLE).replace("'", '"'),
    )  # fmt: skip
    lrs = _lrs(run_dir)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    expected = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.01, pct_start=0.3, total_steps=max_steps
    )
    want = []
    for _ in range(max_steps):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        expected.step()
    assert lrs == pytest.approx(want, rel=1e-6)  # the whole cycle, ending at its floor on the last step
    assert lrs[-1] == pytest.approx(0.01 / 25 / 1e4, rel=1e-3)


def test_one_cycle_of_any_length_steps_without_dividing_by_zero():
    """torch divides by zero when a phase has no steps (pct_start · total = 1: 0.05 in a 20-step run)."""
    for steps in range(1, 41):
        for pct_start in (0.05, 0.1, 0.25, 0.3, 0.5, 1.0):
            optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
            factory = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, pct_start=pct_start)
            scheduler = build_scheduler(factory, optimizer, steps)
            assert scheduler.total_steps == steps
            for _ in range(steps):
                optimizer.step()
                scheduler.step()
                assert math.isfinite(optimizer.param_groups[0]["lr"]), (steps, pct_start)


def test_a_given_length_is_kept_and_cosine_may_leave_its_out():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    given = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, total_steps=50)
    assert build_scheduler(given, optimizer, 10).total_steps == 50  # refused later, by ScheduleLengthCheck
    cosine = build_scheduler(functools.partial(CosineAnnealingLR, eta_min=1e-5), optimizer, 10)
    assert cosine.T_max == 10
    assert build_scheduler(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3), optimizer, 10)
