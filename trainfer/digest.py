"""SHA-256 digests of files and bytes: the one way trainfer checks that a file is the one a record names."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256"]

_BLOCK = 1 << 20


def sha256(data: bytes | str | os.PathLike[str]) -> str:
    """The hex SHA-256 of ``data``: bytes as given, or a file's contents (read in 1 MiB blocks)."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open(data, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
