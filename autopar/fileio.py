"""Reading and writing autopar's files so that a crash or a wrong path never loses data.

`write_atomic(path, text)` writes a temporary file beside the file it replaces and
renames it into place, so a reader sees the old contents or the new, never half of
them. A symlink is followed: the link stays and its target gets the new text.
Only regular files are written; a directory, device, named pipe or socket at the
path is refused, and so is a folder that does not exist (autopar does not create
folders a user names: a typo in one should not leave a new tree behind).
Commands call `check_writable` and `check_readable` on every path first, so a bad
path fails at once rather than after minutes of planning.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from autopar.errors import AutoparError

# What a path holds when it is not a regular file, for error messages.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def check_writable(path: str | os.PathLike, what: str = "file") -> Path:
    """The regular file that writing `path` would replace or create (symlinks followed).

    Raises AutoparError naming the path and the reason when it cannot be written.
    """
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops at a link it cannot resolve: a loop
        raise AutoparError(f"cannot write the {what} to {path}: its symlinks form a loop")
    if target.exists() and not target.is_file():
        raise AutoparError(
            f"cannot write the {what} to {path}: it is {_kind(target)}, not a regular file; "
            "pass the path of a file"
        )
    folder = target.parent
    if not folder.is_dir():
        raise AutoparError(
            f"cannot write the {what} to {path}: folder {folder} does not exist; "
            f"create it first (mkdir -p {folder})"
        )
    if not os.access(folder, os.W_OK):
        raise AutoparError(f"cannot write the {what} to {path}: folder {folder} is not writable")
    return target


def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (a pipe or device could block or never end a read)."""
    path = Path(path)
    if not path.exists():
        raise AutoparError(f"no {what} at {path}")
    if not path.is_file():
        raise AutoparError(f"{path} is {_kind(path)}, not a {what}")
    return path


def write_atomic(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write `text` to a new file beside `path`'s target, then rename it over the target."""
    target = check_writable(path, what)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        file = open(tmp, "x", encoding="utf-8")  # "x": a stray file of that name stays as is
    except OSError as error:
        raise _cannot_write(what, path, error) from None
    try:
        with file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the file
        if target.exists():
            shutil.copymode(target, tmp)  # the replaced file's permissions, not the default
        os.replace(tmp, target)
    except OSError as error:
        raise _cannot_write(what, path, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def _cannot_write(what: str, path, error: OSError) -> AutoparError:
    return AutoparError(f"cannot write the {what} to {path}: {error.strerror or error}")


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")
