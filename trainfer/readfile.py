"""What kind of file a path is, and reading a file from a directory trainfer does not control without blocking.

A name in a bundle may be a FIFO (an unpacked archive can hold one), a device, a directory, a
dangling link or a link to one of them: ``open()`` on a FIFO blocks until a writer comes, forever
if none does, and ``/dev/zero`` never ends. Writes and reads share one check of what a path is
(:func:`irregular`: :func:`trainfer.atomic.check_target` refuses to write over such a path, and
``trainfer compile`` so refuses it as ``runtime.json``'s target):

* :func:`present`: whether an optional file (``runtime.json``, ``quantization.json``) is there;
  nothing at the name is "not there", anything but a regular file is refused;
* :func:`open_regular`: a regular file opened for reading with ``O_NONBLOCK`` and examined again on
  the open descriptor (the name may have changed since the check); anything else is refused.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from trainfer.errors import BundleError, InputError, TrainferError

__all__ = ["file_kind", "irregular", "open_regular", "present"]

_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a pipe",
    stat.S_IFSOCK: "a socket",
}
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words: ``"a regular file"``, ``"a pipe"``, ``"a directory"``..."""
    return _KINDS.get(stat.S_IFMT(mode), "a file of an unknown kind")


def irregular(path: str | os.PathLike[str], role: str, directory: bool = False) -> str | None:
    """What ``path`` is when it exists and is not a regular file (``directory``: not a directory), links
    followed, e.g. ``"a pipe"``, or ``"under a file, not in a directory"`` when one of its parents is
    a file (no write can make it); ``None`` for a new path (a dangling link too) or one of the
    expected kind.

    Raises :class:`~trainfer.errors.InputError` naming ``role`` and ``path`` when ``path`` cannot be
    examined (permission denied, a loop of links).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return "under a file, not in a directory"
    except OSError as error:
        raise InputError(f"{role} {str(path)!r} cannot be examined: {error.strerror or error}") from None
    expected = stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)
    return None if expected else file_kind(mode)


def present(path: str | os.PathLike[str], error: type[TrainferError] = BundleError) -> bool:
    """Whether a regular file (links followed) is at ``path``: ``False`` when nothing is there.

    Raises ``error`` naming ``path`` and what it is when something else is there: ``"'.../runtime.json'
    is a pipe: expected a regular file"`` (also a directory, a device, a socket, a dangling link).
    """
    try:
        kind = irregular(path, "the file")
    except InputError as problem:  # cannot be examined: permission denied, a loop of links
        raise error(str(problem)) from None
    if kind is None and os.path.islink(path) and not os.path.exists(path):
        kind = "a dangling link"
    if kind is not None:
        raise error(f"{str(path)!r} is {kind}: expected a regular file")
    return os.path.exists(path)


def open_regular(path: str | os.PathLike[str], error: type[TrainferError] = BundleError) -> BinaryIO:
    """The regular file at ``path`` opened for binary reading, never blocking on the open.

    Raises ``error`` naming ``path`` when it is missing, cannot be opened, or is not a regular file
    (in :func:`present`'s words), a FIFO put in its place between the check and the open included.
    """
    if not present(path, error):
        raise error(f"cannot read {str(path)!r}: no such file")
    try:
        descriptor = os.open(path, _FLAGS)
    except OSError as problem:
        raise error(f"cannot read {str(path)!r}: {problem.strerror or problem}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise error(f"{str(path)!r} is {file_kind(mode)}: expected a regular file")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")
