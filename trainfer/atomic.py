"""Writes that either complete or leave what was there before untouched.

Every file trainfer writes for a user (bundles, checkpoints, exports, reports, plots) goes through
here: content is written to a temporary sibling, flushed to disk, then renamed over the target.
An interrupted write (exception, Ctrl-C, crash) never destroys the previous version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "fsync_file", "replace_directory", "staging_directory"]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it atomically replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary keeps the target's suffix: some writers (torch.export.save) insist on it.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staging_directory(target: str | os.PathLike[str]) -> Path:
    """A new empty directory beside ``target`` (same file system, so a rename can move it in)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is put back if the move fails."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``target``, on failure it is removed.

    Callers decide beforehand whether an existing ``target`` may be replaced at all.
    """
    target = Path(target)
    staging = staging_directory(target)
    try:
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
