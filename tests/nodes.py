"""Private file-system nodes for the tests of what trainfer refuses to write over: FIFOs, character
devices and links to them, made inside the test's own directory (never a real ``/dev`` node).

Importable as ``nodes`` from the tests (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

#: What :func:`make_node` makes; a test parametrized over them covers each kind of node.
NODES = ["fifo", "character device", "link to a fifo", "link to a character device"]
#: How trainfer names each kind in its refusals.
KIND_OF = {"fifo": "a pipe", "character device": "a character device"}


def make_node(path: Path, kind: str) -> Path:
    """A node of ``kind`` (one of :data:`NODES`) at ``path``; a link points to a node beside it.

    A character device is (1, 3), a null device (writes vanish), which only root may make: the
    test is skipped otherwise.
    """
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "character device":
        if os.geteuid() != 0:
            pytest.skip("only root makes device nodes")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        path.symlink_to(make_node(path.with_name(f"{path.name}.to"), kind.removeprefix("link to a ")))
    return path


def kind_named(kind: str) -> str:
    """How trainfer names the node :func:`make_node` made for ``kind`` (a link: what it points to)."""
    return KIND_OF[kind.removeprefix("link to a ")]


def node_state(path: Path) -> tuple[int, int, int]:
    """What shows a node was left as it is: its type and inode (links followed), and the link's own inode."""
    return (stat.S_IFMT(os.stat(path).st_mode), os.stat(path).st_ino, os.lstat(path).st_ino)
