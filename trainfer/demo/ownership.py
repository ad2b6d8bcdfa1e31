"""Which entries of an earlier demo output a rerun may delete: only what the demo wrote there.

``trainfer demo`` and its sequence step each write a fixed set of files and subdirectories into their output
directory (:attr:`OutputLayout.outputs`), and record in their marker file (``results.json``,
``sequences/scores.json``), under :data:`WRITTEN`, the path of every file they wrote inside those subdirectories,
relative to the output (:meth:`OutputLayout.written`). On a rerun, :meth:`OutputLayout.own` gives the earlier
output's entries that are the demo's own (:data:`trainfer.atomic.OwnFiles`), the only ones the replace deletes:
each file entry, and a subdirectory only when it holds nothing but files the marker records and the directories
leading to them, all regular files and directories, links never followed. A subdirectory that is an output of its
own (``sequences/``: :attr:`OutputLayout.nested`) is judged by its own marker instead, as a whole.

A subdirectory holding anything else (a user's file, a link, a FIFO, a directory that cannot be read) is left out,
so it counts as foreign: the whole earlier output is kept beside the new one, with a warning
(:func:`trainfer.atomic.replace_directory`). One missing some recorded files is still the demo's: the rerun removes
fewer. A marker that records nothing (missing, a link, larger than :attr:`OutputLayout.max_marker_bytes`, not JSON,
written by a trainfer that did not record files) makes every subdirectory that holds anything foreign.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from trainfer.atomic import DIRECTORY, FILE
from trainfer.errors import TrainferError
from trainfer.jsonfile import read_json

__all__ = ["WRITTEN", "OutputLayout"]

#: The marker file's key listing the files the demo wrote inside its subdirectories (:meth:`OutputLayout.written`).
WRITTEN = "written_files"
#: The type :func:`_tree` gives an entry that is neither a regular file nor a directory it could list.
OTHER = 0


@dataclass(frozen=True)
class OutputLayout:
    """What a demo writes into its output directory.

    ``outputs``: each entry it writes there, with its type (:data:`trainfer.atomic.FILE` or
    :data:`~trainfer.atomic.DIRECTORY`); ``marker``: its marker file there, a JSON object of at most
    ``max_marker_bytes`` recording under :data:`WRITTEN` the files it wrote in its subdirectories;
    ``nested``: those of its subdirectories that are outputs of their own, each with its layout.
    """

    outputs: Mapping[str, int]
    marker: str
    max_marker_bytes: int
    nested: Mapping[str, OutputLayout] = field(default_factory=dict)

    def written(self, directory: Path) -> list[str]:
        """What the marker of the output ``directory`` records (:data:`WRITTEN`): the relative paths
        (``digits/test000_label7.png``), sorted, of the regular files in its subdirectories (nested outputs'
        excepted: their own markers record theirs)."""
        tops = [name for name, kind in self.outputs.items() if kind == DIRECTORY and name not in self.nested]
        return sorted(path for top in tops for path, kind in _tree(directory, top) if kind == FILE)

    def own(self, directory: Path) -> dict[str, int]:
        """The entries of the earlier output ``directory`` that are the demo's own (:data:`trainfer.atomic.OwnFiles`):
        :attr:`outputs`, less each subdirectory holding anything the demo did not write (module docstring)."""
        recorded = self._recorded(directory / self.marker)
        return {
            name: kind
            for name, kind in self.outputs.items()
            if kind != DIRECTORY or self._own(directory, name, recorded)
        }

    def whole(self, directory: Path) -> bool:
        """Whether ``directory`` (not a link) holds nothing but this layout's own entries (:meth:`own`)."""
        entries = _entries(directory)
        if entries is None:
            return False
        own = self.own(directory)
        return all(own.get(name) == kind for name, kind in entries.items())

    def _own(self, directory: Path, name: str, recorded: frozenset[str]) -> bool:
        """Whether the subdirectory ``name`` of ``directory`` holds nothing but ``recorded`` files and the directories
        leading to them (a nested output: nothing but its own entries)."""
        if name in self.nested:
            return self.nested[name].whole(directory / name)
        parents = {str(parent) for path in recorded for parent in PurePosixPath(path).parents}
        expected = {FILE: recorded, DIRECTORY: parents}
        return all(path in expected.get(kind, ()) for path, kind in _tree(directory, name))

    def _recorded(self, marker: Path) -> frozenset[str]:
        """The files the marker at ``marker`` records (:data:`WRITTEN`); none when it is not such a marker."""
        if marker.is_symlink():
            return frozenset()
        try:
            found = read_json(marker, max_bytes=self.max_marker_bytes)
        except TrainferError:
            return frozenset()
        paths = found.get(WRITTEN) if isinstance(found, dict) else None
        return frozenset(path for path in paths if isinstance(path, str)) if isinstance(paths, list) else frozenset()


def _tree(root: Path, top: str) -> Iterator[tuple[str, int]]:
    """Every entry under ``root / top``, as its path relative to ``root`` and its type (:data:`~trainfer.atomic.FILE`,
    :data:`~trainfer.atomic.DIRECTORY`, :data:`OTHER`), links never followed. A directory that cannot be listed
    (``top`` itself too: missing, a link, unreadable) is also given as :data:`OTHER`. Lazy: a directory is listed
    only once the caller asks for more after its entry, so a caller stopping at a foreign directory never lists it."""
    pending = [top]
    while pending:
        folder = pending.pop()
        entries = _entries(root / folder)
        if entries is None:
            yield folder, OTHER
            continue
        for name, kind in entries.items():
            yield f"{folder}/{name}", kind
            if kind == DIRECTORY:
                pending.append(f"{folder}/{name}")


def _entries(directory: Path) -> dict[str, int] | None:
    """The entries of ``directory`` with their types (as :func:`_tree` gives them), or ``None`` when it is not a
    directory it can list (a link, even to a directory, is not one)."""
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            return None
        with os.scandir(directory) as found:
            return {entry.name: _kind(entry) for entry in found}
    except OSError:
        return None


def _kind(entry: os.DirEntry[str]) -> int:
    if entry.is_dir(follow_symlinks=False):
        return DIRECTORY
    return FILE if entry.is_file(follow_symlinks=False) else OTHER
