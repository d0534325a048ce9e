"""Quiet by default (issue 21.7): third-party noise is filtered by its exact message, distilkit's own warnings
are one line, and the quickstart's fit prints no warning at all."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
from helpers import ROOT

from distilkit.commands.quiet import NOISE_WARNINGS, DropInfo, one_line, quiet_third_party


def test_the_noise_is_filtered_and_a_new_warning_of_the_same_library_is_not(recwarn):
    quiet_third_party()
    for message in (
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
        "The dirpath has changed from 'runs/a/checkpoints' to 'runs/a/predict/checkpoints', therefore ...",
        "Checkpoint directory /x/checkpoints exists and is not empty.",
        "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization "
        "state was saved. The checkpoint will contain the model state AFTER optimization. ...",
    ):
        warnings.warn(message, UserWarning, stacklevel=1)
    warnings.warn("something Lightning says that a user needs", UserWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["something Lightning says that a user needs"]
    assert all(reason for _, reason in NOISE_WARNINGS), "every filter says why"


def test_lightnings_advertisements_are_dropped_and_its_information_kept():
    record = logging.LogRecord(
        "x", logging.INFO, "f", 1, "💡 Tip: For seamless cloud logging ...", None, None
    )
    assert not DropInfo().filter(record)
    record = logging.LogRecord("x", logging.INFO, "f", 1, "GPU available: False, used: False", None, None)
    assert DropInfo().filter(record)


def test_distilkits_own_warnings_are_one_line():
    from distilkit.data import token_cache

    line = one_line(
        UserWarning("token cache x differs: rebuilding it"), UserWarning, token_cache.__file__, 88
    )
    assert line == "warning: token cache x differs: rebuilding it\n"
    other = one_line(UserWarning("elsewhere"), UserWarning, "/usr/lib/python3/x.py", 3, "source")
    assert "x.py:3" in other


@pytest.mark.slow
def test_the_quickstart_fit_prints_no_warning_lines(tmp_path):
    """The issue's test: `distilkit fit --config recipes/quickstart.yaml --trainer.max_steps 5` (here into a
    fresh run directory, with a fresh distilkit cache: tokenizing too), stdout and stderr together."""
    env = {**os.environ, "DISTILKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "distilkit", "fit", "--config", "recipes/quickstart.yaml",
         "--trainer.max_steps", "5", "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    noise = re.compile(r"warn|deprecat|tip:|weights_only|litlogger|/-\d|%\|", re.IGNORECASE)
    assert not [line for line in printed.splitlines() if noise.search(line)], printed[-3000:]
    assert "teacher            recipes/teacher (weights sha256 " in result.stdout
