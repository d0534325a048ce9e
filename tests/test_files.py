"""Every writer goes through distilkit.files: a failure never leaves half a file or a stray temporary."""

from __future__ import annotations

import os
import stat

import pytest

from distilkit.errors import ConfigError
from distilkit.files import atomic_directory, atomic_write, check_writable, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target) as file:
        file.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_files_and_directories_get_the_permissions_open_would_give(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
        with atomic_directory(tmp_path / "d") as staging:
            (staging / "inside.txt").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert (tmp_path / "d" / "inside.txt").read_text() == "y"


def test_a_directory_is_never_written_over_unless_asked(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"), atomic_directory(tmp_path / "d"):
        pass
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"], "the staging directory was left behind"


def test_an_unwritable_output_is_refused_before_any_work(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    with pytest.raises(ConfigError, match="output_json"):
        check_writable(blocked / "out.json", "output_json")
    check_writable(tmp_path / "new" / "deeper" / "out.json", "output_json")  # creatable: fine
