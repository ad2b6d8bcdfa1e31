"""SHA-256 digests of files and bytes: the one way trainfer checks that a file is the one a record names."""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

from trainfer.readfile import open_regular

__all__ = ["sha256"]

_BLOCK = 1 << 20


def sha256(data: bytes | str | os.PathLike[str] | BinaryIO) -> str:
    """The hex SHA-256 of ``data``: bytes as given, an open binary file's contents from where it
    stands, or a named regular file's contents (both read in 1 MiB blocks).

    A named file is opened without blocking (:func:`trainfer.readfile.open_regular`): a FIFO, a device
    or a directory at the name, even one put there after the caller checked it, is a
    :class:`~trainfer.errors.BundleError` naming what it is, never waited on.
    """
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    if not isinstance(data, (str, os.PathLike)):
        return _file_sha256(data)
    with open_regular(data) as handle:
        return _file_sha256(handle)


def _file_sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()
