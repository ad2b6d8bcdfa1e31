"""SHA-256 digests of files and bytes: the one way trainfer checks that a file is the one a record names."""

from __future__ import annotations

import hashlib
import os

from trainfer.readfile import open_regular

__all__ = ["sha256"]

_BLOCK = 1 << 20


def sha256(data: bytes | str | os.PathLike[str]) -> str:
    """The hex SHA-256 of ``data``: bytes as given, or a regular file's contents (read in 1 MiB blocks).

    A file is opened without blocking (:func:`trainfer.readfile.open_regular`): a FIFO, a device or a
    directory at the name, even one put there after the caller checked it, is a
    :class:`~trainfer.errors.BundleError` naming what it is, never waited on.
    """
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open_regular(data) as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
