"""Directories the user names for output: refused with a one-line `UserError` when they cannot be one."""

from __future__ import annotations

from pathlib import Path

from tropd.errors import UserError


def directory_path(path: str | Path, what: str) -> Path:
    """`path` as a Path, once neither it nor any folder above it is an existing file."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "" if parent == path else f": {str(parent)!r} is a file"
            raise UserError(f"{what} {str(path)!r} cannot be a directory{where or ' (it is a file)'}")
    return path
