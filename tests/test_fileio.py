"""fileio.write_atomic: writes go through symlinks, never replace what is not a regular file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from autopar.errors import AutoparError
from autopar.fileio import check_readable, write_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    write_atomic(tmp_path / "new.json", "{}")
    (tmp_path / "plain.json").write_text("{}")  # what open() would have made
    assert (tmp_path / "new.json").read_text() == "{}"
    assert (tmp_path / "new.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
    assert _leftovers(tmp_path) == []


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "secret.json"
    path.write_text("old")
    path.chmod(0o600)
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_is_written_through_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "plan.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "real") == []


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to("made.json")
    write_atomic(link, "new")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "new"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("folder", "it is a directory"),
        ("pipe", "it is a named pipe"),
        ("loop", "its symlinks form a loop"),
        ("missing/p.json", "does not exist; create it first"),
        ("/dev/full", "it is a character device"),
    ],
)
def test_what_is_not_a_regular_file_is_refused_and_left_alone(tmp_path, name, message):
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "loop").symlink_to("loop")
    before = sorted(os.listdir(tmp_path)), Path("/dev/full").lstat()
    with pytest.raises(AutoparError, match=message):
        write_atomic(tmp_path / name, "text", "plan")
    assert (sorted(os.listdir(tmp_path)), Path("/dev/full").lstat()) == before


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "\ud800")  # a lone surrogate cannot be encoded: fails mid-write
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_stray_file_with_the_temporary_name_is_not_touched(tmp_path):
    stray = tmp_path / f".plan.json.{os.getpid()}.tmp"
    stray.write_text("someone else's")
    with pytest.raises(AutoparError, match="cannot write the file"):
        write_atomic(tmp_path / "plan.json", "new")
    assert stray.read_text() == "someone else's"
    assert not (tmp_path / "plan.json").exists()


def test_check_readable_refuses_folders_and_missing_files(tmp_path):
    with pytest.raises(AutoparError, match="is a directory, not a plan file"):
        check_readable(tmp_path, "plan file")
    with pytest.raises(AutoparError, match="no plan file at"):
        check_readable(tmp_path / "nope.json", "plan file")
