"""Checks of command-line values that several sub-commands share, run before any model is loaded.

A command that would fail only when it writes its output, after minutes or hours of work, fails here instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tomoe.errors import ToMoEError


def check_output_file(path: str | Path, flag: str, example: str) -> Path:
    """A file the command writes at its end: not a folder, and creatable (its folder exists or can be made, and is
    writable). ``example`` is a file name to suggest. Nothing is created here."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ToMoEError(f"{flag} {str(path)!r} is a folder; pass a file name such as {str(path / example)!r}.")
    _check_creatable(path, flag)
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A folder the command creates or writes into: not a file, and writable (or creatable where it is missing)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ToMoEError(f"{flag} {str(path)!r} is a file; pass a folder path (new, or empty).")
    _check_creatable(path / "file", flag, shown=path)
    return path


def _check_creatable(path: Path, flag: str, shown: Path | None = None) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder in which a file can really be made (a probe
    file, removed at once: permission bits do not tell about read-only mounts, or root)."""
    shown = shown or path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ToMoEError(f"{flag} {str(shown)!r} cannot be created: {str(ancestor)!r} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise ToMoEError(f"{flag} {str(shown)!r} cannot be written: nothing can be created in {str(ancestor)!r} "
                         f"({error.strerror or error}). Pass a path in a writable folder.") from None
