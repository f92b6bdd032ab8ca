"""Crash-safe file writes shared by checkpoints and prepared data folders."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `directory` in two renames.

    If the process dies between the renames, `directory` is missing and `.NAME.old` still holds
    the previous version; `recover_dir` puts it back.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp"
    old = directory.parent / f".{directory.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    recover_dir(directory)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory.parent)


def recover_dir(directory: Path) -> None:
    """Restore `directory` from `.NAME.old` if a write died between its two renames."""
    old = directory.parent / f".{directory.name}.old"
    if not directory.exists() and old.exists():
        os.replace(old, directory)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
