"""Writes that either complete or leave what was there before untouched.

Every file trainfer writes for a user (bundles, checkpoints, exports, reports, plots) goes through
here: content is written to a temporary sibling, flushed to disk, then renamed over the target.
An interrupted write (exception, Ctrl-C, crash) never destroys the previous version.

A directory is replaced by an atomic exchange where the system has one (Linux ``renameat2`` with
``RENAME_EXCHANGE``): the path always holds the old or the new directory, never nothing.
Elsewhere the old directory is renamed aside (``.NAME.PID-HEX.old``) before the new one moves in;
a crash between those two renames is repaired by :func:`recover`, which the next write (and the
next bundle load) runs: it puts the previous version back and removes what dead writers left
(staging ``.NAME.PID-XXXX.tmp`` directories, ``.old`` copies). A writer counts as dead when its
process id no longer runs on this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from trainfer.errors import TrainferError, WriteError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "fsync_file",
    "recover",
    "replace_directory",
    "staging_directory",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it atomically replaces ``target``.

    An ``OSError`` while writing (disk full, permission denied) becomes a :class:`WriteError` naming ``target``.
    """
    target = Path(target)
    with _naming_failures(target):
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
    """A new empty directory beside ``target`` (same file system, so a rename can move it in).

    Runs :func:`recover` first, so leftovers of an earlier crashed write are dealt with.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent))


def replace_directory(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``, replacing an existing ``target`` (see the module docstring)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        _fsync_directory(target.parent)
        return
    previous = new if _exchange(new, target) else _move_aside_then_in(new, target)
    _fsync_directory(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _move_aside_then_in(new: Path, target: Path) -> Path:
    """Rename ``target`` to a ``.old`` sibling, then ``new`` to ``target``; return the ``.old`` path.

    Between the two renames ``target`` is missing: :func:`recover` repairs a crash there.
    """
    old = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex}.old"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def recover(target: str | os.PathLike[str]) -> None:
    """Repair what a crashed replace of ``target`` left behind; a no-op when nothing was left.

    If ``target`` is missing, the newest ``.old`` copy of a dead writer becomes ``target`` again
    (the crash came between the two renames of a non-exchanging replace). Then dead writers'
    staging directories and ``.old`` copies beside ``target`` are removed. Live writers' files are
    never touched. Failures (a read-only directory, a concurrent recovery) are ignored.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)-)?[a-z0-9_]+\.(tmp|old)$")
    try:
        found = [(entry, pattern.match(entry.name)) for entry in os.scandir(target.parent)]
    except OSError:
        return
    stale = [(Path(entry.path), match[2]) for entry, match in found if match and entry.is_dir() and _dead(match[1])]
    olds = sorted((path for path, kind in stale if kind == "old"), key=_mtime, reverse=True)
    with contextlib.suppress(OSError):
        if olds and not target.exists():
            os.rename(olds[0], target)
            _fsync_directory(target.parent)
    for path, _ in stale:
        shutil.rmtree(path, ignore_errors=True)


def _dead(pid: str | None) -> bool:
    """Whether the writer with process id ``pid`` (``None``: written before ids were recorded) is gone."""
    if pid is None:
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False
    return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (Linux, glibc 2.28+), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; ``False`` where the system or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync_directory(path: Path) -> None:
    """Make the renames inside directory ``path`` durable (POSIX; a no-op where unsupported)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _naming_failures(target: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` (not already a trainfer error) as a :class:`WriteError` naming ``target``."""
    try:
        yield
    except OSError as error:
        if isinstance(error, TrainferError):
            raise
        failure = WriteError(f"cannot write {str(target)!r}: {error.strerror or error}")
        failure.errno = error.errno
        raise failure from error


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``target``, on failure it is removed.

    Callers decide beforehand whether an existing ``target`` may be replaced at all. An ``OSError``
    while writing becomes a :class:`WriteError` naming ``target``.
    """
    target = Path(target)
    with _naming_failures(target):
        staging = staging_directory(target)
        try:
            yield staging
            replace_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
