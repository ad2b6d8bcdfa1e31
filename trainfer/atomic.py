"""Writes that either complete or leave what was there before untouched.

Every file trainfer writes for a user (bundles, checkpoints, exports, reports, plots) goes through
here: content is written to a temporary sibling, flushed to disk, then renamed over the target.
An interrupted write (exception, Ctrl-C, crash) never destroys the previous version, and what a
killed one left beside the target is removed by the next write of the same path (:func:`recover`).

Only a file or a directory is ever replaced: a rename would put a regular file in place of a
device, a FIFO or a link to one (``/dev/full``, a link to ``/proc/self/fd/1``), so a file write
refuses a target that exists and is not a regular file, and a directory write one that exists and
is not a directory, links followed (:func:`check_target`, :class:`~trainfer.errors.InputError`;
the commands call it up front, before any expensive work).

A directory is replaced by an atomic exchange where the system has one (Linux ``renameat2`` with
``RENAME_EXCHANGE``): the path always holds the old or the new directory, never nothing.
Elsewhere the old directory is renamed aside before the new one moves in; a crash between those
two renames is repaired by :func:`recover`, which the next write of the same path runs.

Recovery touches only what trainfer can prove it made. Every write first creates a *journal*
beside the target, ``.NAME.trainfer-TOKEN.journal`` (``TOKEN``: 32 random hex digits; created
exclusively, never through a link), recording the writer's process id and host name, and then the
identity (device, inode) of each thing it makes or moves aside: a file write's temporary file
``.NAME.trainfer-TOKEN.tmpSUFFIX`` (a regular file; ``SUFFIX``: the target's, when short), a directory write's
staging directory ``.NAME.trainfer-TOKEN.tmp`` and the previous version ``.NAME.trainfer-TOKEN.old``. ``NAME``
is the target's name, or for a name too long to leave room for these additions, its start and a digest of it:
any name a plain write could create can be written.
:func:`recover` acts on a leftover only when all of these hold: a journal of the exact name, a
regular file owned by this user, at most 4096 bytes, whose header names the same token and target;
its writer ran on this host and its process id no longer runs; and the file or directory at the
token's name (never a link) has the identity the journal recorded. Anything else (a user's
``.NAME.backup.old`` or ``.NAME.1234abcd.tmp.json``, a copy, a renamed directory, a forged name
without a journal) is left as it is. The one exception is an *empty* directory or file at a
journaled name (a crash between creating it and recording it): removing it cannot lose data.
Reads never recover: see :func:`interrupted_write`.

The previous version is deleted whole only when the writer owns all of it. A writer that owns only some
files of the directory it replaces (a bundle: :func:`trainfer.serve.bundle_format.own_files`) passes
``own``: just before the exchange the journal records the identity of each of those files (or of its
subdirectories it owns with all they hold: ``trainfer demo`` claims one only when all it holds is the demo's,
:mod:`trainfer.demo.ownership`), each only when it has the type the writer writes there (:data:`OwnFiles`), and
afterwards only they are removed and the emptied directory removed with ``rmdir``. Anything else found there (a
file someone wrote into the directory while it was being rewritten, or one that was there before, which
``trainfer demo`` allows) keeps the previous version whole: it is renamed to
``NAME.previous-version-with-your-files`` beside the target, with a :class:`WriteWarning` naming it
(:func:`_discard_previous`; recovery after a crash does the same).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trainfer.errors import InputError, TrainferError, WriteError, WriteWarning
from trainfer.readfile import irregular

__all__ = [
    "DIRECTORY",
    "FILE",
    "Leftovers",
    "atomic_directory",
    "atomic_file",
    "check_target",
    "fsync_file",
    "interrupted_write",
    "named",
    "recover",
    "remove_staging",
    "replace_directory",
    "staging_directory",
]

JOURNAL_FORMAT = "trainfer-recovery"
MAX_JOURNAL_BYTES = 4096
#: What the previous version of a directory is renamed to when it holds files that are not the writer's.
KEPT_SUFFIX = ".previous-version-with-your-files"
#: How many entries a message names (:func:`named`).
SHOWN_ENTRIES = 3
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})
_STAGING = re.compile(r"\.(.+)\.trainfer-([0-9a-f]{32})\.tmp")
_JOURNAL_NAME = re.compile(r"\.(.+)\.trainfer-[0-9a-f]{32}\.journal")
#: The longest target name (in bytes) the names beside it spell out whole: ``.NAME.trainfer-TOKEN.tmpSUFFIX`` adds 43
#: bytes and at most 20 more, and a file name has at most 255. A longer name is written there as its first characters
#: and a digest of it (:func:`_stem`).
_MAX_STEM_BYTES = 192
#: The longest file name most file systems take, in bytes (``NAME_MAX``).
_MAX_NAME_BYTES = 255
#: The longest target suffix a temporary file keeps (``.pt2``, ``.onnx``); a longer "suffix" is part of a name.
_MAX_KEPT_SUFFIX = 16
#: What a journal may record a write made, and the file type each is: a directory write's staging directory and
#: the previous version it moved aside, a file write's temporary file.
_RECORDED = {"staging": stat.S_IFDIR, "old": stat.S_IFDIR, "file": stat.S_IFREG}

Identity = tuple[int, int]
#: What a writer writes at one of its own entries (:data:`OwnFiles`): a regular file, or a directory with all it holds
#: (a writer names one only when all it holds is its own: it is deleted whole).
FILE, DIRECTORY = stat.S_IFREG, stat.S_IFDIR
#: Given the directory a write replaces, its entries that are the writer's own (the only ones it may delete), each
#: name with what the writer writes there (:data:`FILE` or :data:`DIRECTORY`): an entry of that name and another
#: type (a user's directory under a bundle file's name) is not the writer's. A writer passing none owns the whole
#: directory.
OwnFiles = Callable[[Path], Mapping[str, int]]


def named(entries: Collection[str]) -> str:
    """``'a', 'b', 'c' and 2 more``: up to :data:`SHOWN_ENTRIES` of the sorted ``entries``, for a one-line message."""
    ordered = sorted(entries)
    more = f" and {len(ordered) - SHOWN_ENTRIES} more" if len(ordered) > SHOWN_ENTRIES else ""
    return ", ".join(map(repr, ordered[:SHOWN_ENTRIES])) + more


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def check_target(target: str | os.PathLike[str], option: str = "", directory: bool = False) -> None:
    """Refuse to write ``target`` when it exists and is not a regular file (``directory``: not a
    directory), links followed: a device, a FIFO, a socket, a link to one of them.

    A link to a file of the expected kind is fine (a file write replaces the link by the new file, as
    :func:`os.replace` does; so does a directory write). Raises :class:`~trainfer.errors.InputError`,
    ``"OPTION 'PATH' is a pipe: expected a new path or a regular file"`` (``option``: the command
    line option that named ``target``, if any).
    """
    role = f"{option} " if option else ""
    kind = irregular(target, role.strip() or "the target", directory)
    if kind:
        expected = "a directory" if directory else "a regular file"
        raise InputError(f"{role}{str(target)!r} is {kind}: expected a new path or {expected}")


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], leftovers: Leftovers | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it atomically replaces ``target``.

    A ``target`` that exists and is not a regular file (links followed) is refused when the write
    starts and again just before the rename (:func:`check_target`). An ``OSError`` while writing
    (disk full, permission denied) becomes a :class:`WriteError` naming ``target``. ``leftovers``: a
    writer of many files shares one, so that each directory is listed once (:class:`Leftovers`).
    """
    target = Path(target)
    with _naming_failures(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        check_target(target)
        recover(target, leftovers)  # what a killed earlier write of ``target`` left: its temporary file, proven
        journal = _Journal.create(target, durable=False)  # it proves a temporary file: no fsync needed
        tmp = journal.temporary_file()
        try:
            _new_file(tmp, target)
            journal.record("file", tmp)
            yield tmp
            fsync_file(tmp)
            check_target(target)  # the writer may have taken long: the last check, just before the rename
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if not os.path.lexists(tmp):  # else its journal stays: a later write proves the file its own
                journal.close()


def _new_file(path: Path, target: Path) -> None:
    """Create the empty file ``path`` (exclusively, never through a link) with the mode ``target`` has, or for a
    new target the mode the umask gives any new file: ``tempfile.mkstemp``'s 0600 narrowed every rewritten
    file, so that a server running as another user could no longer read the bundle it served."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(path, flags, 0o666))  # the umask applies, as to any new file
    _keep_mode(target, path)


def _keep_mode(target: Path, new: Path) -> None:
    """Give ``new`` the permission bits of ``target`` (links followed), when it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))


# --------------------------------------------------------------------------- the journal
@dataclass
class _Journal:
    """What one write of ``target`` made: its token, writer and the identities it recorded."""

    target: Path
    token: str
    pid: int = 0
    host: str = ""
    owned: dict[str, Identity] = field(default_factory=dict)  # "staging" / "old" / "file" -> (device, inode)
    files: dict[str, Identity] | None = None  # the writer's own entries in "old" (None: all of it is the writer's)
    durable: bool = True  # each entry flushed to disk (fsync) before the write goes on

    def sibling(self, kind: str) -> Path:
        """``.NAME.trainfer-TOKEN.KIND`` beside the target (``tmp``, ``old``, ``journal``; ``NAME``: :func:`_stem`)."""
        return self.target.parent / f".{_stem(self.target.name)}.trainfer-{self.token}.{kind}"

    def temporary_file(self) -> Path:
        """``.NAME.trainfer-TOKEN.tmpSUFFIX``, a file write's temporary file: it keeps the target's suffix (some
        writers, ``torch.export.save``, insist on it), when at most :data:`_MAX_KEPT_SUFFIX` bytes."""
        suffix = self.target.suffix
        return self.sibling("tmp" + (suffix if len(os.fsencode(suffix)) <= _MAX_KEPT_SUFFIX else ""))

    @classmethod
    def create(cls, target: Path, durable: bool = True) -> _Journal:
        """A new journal for a write of ``target`` (created exclusively: never an existing file or a link).

        ``durable``: each entry is flushed to disk before the write goes on, so that it survives a power
        loss, not only a killed process (whose writes the system keeps): a directory write needs it to put
        back a previous version moved aside; a file write's journal, which only proves its temporary file
        trainfer's, does not (after a power loss that file may stay, unproven, never removed).
        """
        journal = cls(target, secrets.token_hex(16), os.getpid(), socket.gethostname(), durable=durable)
        header = {"format": JOURNAL_FORMAT, "version": 1, "token": journal.token, "target": target.name}
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        descriptor = os.open(journal.sibling("journal"), flags, 0o600)
        os.close(descriptor)
        journal._append({**header, "pid": journal.pid, "host": journal.host})
        return journal

    @classmethod
    def of(cls, directory: Path) -> _Journal | None:
        """The journal of the staging directory ``directory`` (or of its parent), read back, if it has one (the
        target it names passes :meth:`read`'s checks: its name spells the journal's)."""
        for candidate in (Path(directory), Path(directory).parent):
            match = _STAGING.fullmatch(candidate.name)
            if match:
                path = candidate.parent / f".{match[1]}.trainfer-{match[2]}.journal"
                name = _recorded_target(path)
                return None if name is None else cls.read(path, candidate.parent / name)
        return None

    def record(self, kind: str, path: Path, files: Mapping[str, int] | None = None) -> None:
        """Record that the directory (``file``: the regular file) now at ``path`` is this write's ``kind`` (one of
        :data:`_RECORDED`), and with ``files`` the identity of each of those entries in it that has the type
        ``files`` gives it (the writer's own: see :data:`OwnFiles`)."""
        identity = _identity(path, _RECORDED[kind])
        if identity is None:
            return
        entry: dict[str, object] = {kind: list(identity)}
        if files is not None:
            found = {name: _identity(path / name, written) for name, written in files.items()}
            self.files = {name: file for name, file in found.items() if file is not None}
            entry["files"] = {name: list(file) for name, file in self.files.items()}
        self.owned[kind] = identity
        self._append(entry)

    def _append(self, entry: dict[str, object]) -> None:
        line = json.dumps(entry) + "\n"
        if os.path.getsize(self.sibling("journal")) + len(line.encode()) > MAX_JOURNAL_BYTES:
            raise WriteError(f"cannot journal the write of {str(self.target)!r}: over {MAX_JOURNAL_BYTES} bytes")
        with open(self.sibling("journal"), "a", encoding="utf-8") as handle:
            handle.write(line)
            if self.durable:
                handle.flush()
                os.fsync(handle.fileno())

    def close(self) -> None:
        """Remove the journal (the write is complete or cleaned up)."""
        with contextlib.suppress(OSError):
            os.unlink(self.sibling("journal"))

    @classmethod
    def read(cls, path: Path, target: Path) -> _Journal | None:
        """The journal at ``path`` for ``target`` if it passes every check (module docstring), else ``None``."""
        match = re.fullmatch(rf"\.{re.escape(_stem(target.name))}\.trainfer-([0-9a-f]{{32}})\.journal", path.name)
        try:
            info = os.lstat(path)
            if not match or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JOURNAL_BYTES:
                return None
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                return None
            with open(path, "rb") as handle:
                lines = handle.read(MAX_JOURNAL_BYTES).decode("utf-8").splitlines()
            entries = [json.loads(line) for line in lines[:3]]
        except (OSError, ValueError, RecursionError):
            return None
        if not entries or not all(isinstance(entry, dict) for entry in entries):
            return None
        return cls._checked(target, match[1], entries)

    @classmethod
    def _checked(cls, target: Path, token: str, entries: list[dict]) -> _Journal | None:
        header = entries[0]
        expected = {"format": JOURNAL_FORMAT, "version": 1, "token": token, "target": target.name}
        if any(header.get(key) != value for key, value in expected.items()):
            return None
        pid, host = header.get("pid"), header.get("host")
        if type(pid) is not int or not isinstance(host, str):
            return None
        owned: dict[str, Identity] = {}
        files: dict[str, Identity] | None = None
        for entry in entries[1:]:
            for kind in _RECORDED:
                identity = _parsed_identity(entry.get(kind))
                if identity is not None:
                    owned[kind] = identity
            if isinstance(entry.get("files"), dict):
                files = {}
                for name, value in entry["files"].items():
                    identity = _parsed_identity(value)
                    if identity is not None and name not in ("", ".", "..") and name == os.path.basename(name):
                        files[name] = identity  # a plain name: never a path out of the directory
        return cls(target, token, pid, host, owned, files)

    def dead(self) -> bool:
        """Whether the writer ran on this host and its process no longer runs."""
        if self.host != socket.gethostname() or self.pid == os.getpid() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, OSError):
            return False
        return False


def _stem(name: str) -> str:
    """What the names beside target ``name`` spell it as: ``name`` itself, or for a name over :data:`_MAX_STEM_BYTES`
    bytes (no room left for the journal's additions), its first characters, ``~`` and 16 hex digits of its sha256."""
    encoded = os.fsencode(name)
    if len(encoded) <= _MAX_STEM_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    return _fitting(name, _MAX_STEM_BYTES - len(digest) - 1) + "~" + digest


def _fitting(name: str, most: int) -> str:
    """The longest start of ``name`` that is at most ``most`` bytes in the file system's encoding, cut between
    characters: a cut inside a multi-byte character would leave bytes that are not UTF-8, which a file name may
    hold but libraries that decode it (ONNX Runtime) refuse."""
    cut = name[:most]  # never fewer bytes than characters
    while len(os.fsencode(cut)) > most:
        cut = cut[:-1]
    return cut


def _recorded_target(path: Path) -> str | None:
    """The target name the journal at ``path`` records in its header (a plain name), unchecked otherwise; ``None``
    when it has none (the journal proves nothing until :meth:`_Journal.read` checks it whole)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        with open(os.open(path, flags), "rb") as handle:  # never a link; a pipe does not block
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            header = json.loads(handle.readline(MAX_JOURNAL_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    name = header.get("target") if isinstance(header, dict) else None
    if isinstance(name, str) and name not in ("", ".", "..") and name == os.path.basename(name):
        return name
    return None


def _parsed_identity(value: object) -> Identity | None:
    """A journal's ``[device, inode]`` as an :data:`Identity`, or ``None`` if ``value`` is not one."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return (value[0], value[1])
    return None


def _identity(path: Path, kind: int = stat.S_IFDIR) -> Identity | None:
    """(device, inode) of the directory (``kind``: of that file type) at ``path``, never following a link;
    ``None`` otherwise."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_IFMT(info.st_mode) == kind else None


def _own_identity(path: Path) -> Identity | None:
    """(device, inode) of the regular file or directory at ``path`` (not a link), the entries a writer may
    own (:data:`OwnFiles`); ``None`` otherwise."""
    return _identity(path, stat.S_IFREG) or _identity(path, stat.S_IFDIR)


def _remove_own(path: Path) -> None:
    """Remove the writer's own entry ``path``: a file, or a directory with all it holds."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


class Leftovers:
    """The journals in directories, listed once each, for a writer of many files into one directory.

    Recovery looks for a killed write's journal beside each target, which lists the target's directory:
    ``n`` writes into a directory of ``n`` files cost ``n**2`` entries read (0.55 ms a write at 2000 entries).
    A writer that passes one :class:`Leftovers` to all its :func:`atomic_file` calls lists each directory
    once. A journal that appears after that listing (a writer killed meanwhile) is found by a later write
    made without it.
    """

    def __init__(self) -> None:
        self._listed: dict[Path, dict[str, list[str]]] = {}

    def journal_names(self, target: Path) -> list[str]:
        """The names beside ``target`` that spell a journal of a write of it, as listed first."""
        if target.parent not in self._listed:
            self._listed[target.parent] = _journals_by_stem(target.parent)
        return self._listed[target.parent].get(_stem(target.name), [])


def _journals_by_stem(directory: Path) -> dict[str, list[str]]:
    """The names in ``directory`` spelled like journals (``.STEM.trainfer-TOKEN.journal``), by ``STEM``."""
    found: dict[str, list[str]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        match = _JOURNAL_NAME.fullmatch(name) if name.endswith(".journal") else None
        if match:
            found.setdefault(match[1], []).append(name)
    return found


def _dead_journals(target: Path, leftovers: Leftovers | None = None) -> list[_Journal]:
    """The proven journals of dead writers of ``target`` (``leftovers``: as that listing found them)."""
    names = (leftovers or Leftovers()).journal_names(target)  # without one, the directory is listed now
    journals = (_Journal.read(target.parent / name, target) for name in names)
    return [journal for journal in journals if journal is not None and journal.dead()]


# --------------------------------------------------------------------------- directories
def staging_directory(target: str | os.PathLike[str]) -> Path:
    """A new empty directory beside ``target`` (same file system, so a rename can move it in).

    Refuses a ``target`` that exists and is not a directory (:func:`check_target`). Runs
    :func:`recover` first, so leftovers of an earlier crashed write are dealt with; journals the new
    directory (module docstring). Remove it with :func:`remove_staging` if it is not used.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_target(target, directory=True)
    recover(target)
    journal = _Journal.create(target)
    staging = journal.sibling("tmp")
    os.mkdir(staging, 0o777)  # the umask applies, as to any new directory
    _keep_mode(target, staging)  # a rewrite keeps the directory's permissions
    journal.record("staging", staging)
    return staging


def remove_staging(staging: Path) -> None:
    """Remove the staging directory ``staging`` (made by :func:`staging_directory`) and its journal.

    After its exchange the staging name holds the previous version: that is discarded as the write would
    have (:func:`_discard_previous`), never removed whole if it holds more than the writer's own files.
    """
    journal = _Journal.of(Path(staging))
    if journal is None:
        shutil.rmtree(staging, ignore_errors=True)
    else:
        _clean(journal)


def replace_directory(new: Path, target: Path, own: OwnFiles | None = None) -> None:
    """Move directory ``new`` to ``target``, replacing an existing ``target`` (see the module docstring).

    ``own``: which files of the previous ``target`` are the writer's (:data:`OwnFiles`): only those are
    deleted, and a previous version holding anything else is kept beside ``target``
    (:func:`_discard_previous`). Without it the whole previous directory is the writer's.

    ``new`` is a :func:`staging_directory` or a directory inside one (its journal is completed and
    removed); any other directory gets a journal of its own for the replace. A ``target`` that
    exists and is not a directory, links followed (a file, a device, a FIFO), is refused with
    :class:`~trainfer.errors.InputError` and left as it is; a link to a directory is replaced by
    ``new``, what it pointed to untouched.
    """
    new, target = Path(new), Path(target)
    journal = _Journal.of(new)
    if not os.path.lexists(target):
        os.rename(new, target)
        _fsync_directory(target.parent)
    else:
        check_target(target, directory=True)
        journal = journal or _Journal.create(target)
        files = None if own is None or os.path.islink(target) else own(target)
        journal.record("old", target, files)  # the same inodes wherever the renames below move them
        previous = new if _exchange(new, target) else _move_aside_then_in(new, target, journal.sibling("old"))
        _fsync_directory(target.parent)
        if os.path.islink(previous):  # a link stood at the target: it goes, what it pointed to is untouched
            os.unlink(previous)
        else:
            _discard_previous(previous, journal)
        if os.path.lexists(previous):
            return  # kept where it is (it could not be renamed): the journal stays, a later recover retries
    if journal is not None:
        journal.close()


def _discard_previous(previous: Path, journal: _Journal) -> None:
    """Remove ``previous``, the version of ``journal.target`` its write replaced: whole when the writer owns all
    of it (``journal.files`` is ``None``); otherwise only the files the journal records as the writer's (each
    still the recorded file), then the emptied directory (``rmdir``). One holding anything else is kept whole,
    renamed beside the target with a warning (:func:`_keep`): nothing the writer does not own is deleted."""
    files = journal.files
    if files is None:
        shutil.rmtree(previous, ignore_errors=True)
        return
    foreign = _foreign(previous, files)
    if not foreign:
        for name, identity in files.items():
            if _own_identity(previous / name) == identity:
                _remove_own(previous / name)
        with contextlib.suppress(OSError):
            os.rmdir(previous)  # only ever removes an empty directory
    if os.path.lexists(previous):
        _keep(previous, journal.target, foreign or _foreign(previous, {}))


def _foreign(directory: Path, files: dict[str, Identity]) -> list[str]:
    """The entries of ``directory`` that are not one of ``files`` (by name and identity)."""
    with os.scandir(directory) as entries:
        names = [entry.name for entry in entries]
    return [name for name in names if name not in files or _own_identity(directory / name) != files[name]]


def _keep(previous: Path, target: Path, foreign: Collection[str]) -> None:
    """Rename ``previous`` (a replaced version of ``target`` holding ``foreign``, entries its writer does not own)
    to the first free ``NAME`` :data:`KEPT_SUFFIX` (``-2``, ``-3``, ...; ``NAME`` cut between characters to fit
    :data:`_MAX_NAME_BYTES`) beside ``target``, and warn naming
    them and where they are (:class:`WriteWarning`). Where the rename fails, ``previous`` stays, and the
    warning names it."""
    place = previous
    with contextlib.suppress(OSError):
        for number in range(1, 1000):
            ending = f"{KEPT_SUFFIX}{f'-{number}' if number > 1 else ''}"
            kept = target.with_name(_fitting(target.name, _MAX_NAME_BYTES - len(ending)) + ending)
            if _rename_noreplace(previous, kept):
                _fsync_directory(target.parent)
                place = kept
                break
    warnings.warn(
        f"{str(target)!r} was rewritten, but it held {named(foreign)} besides its writer's files (put there before "
        f"or during the rewrite): nothing was deleted, the previous version is kept with them in {str(place)!r}",
        WriteWarning,
        stacklevel=2,
    )


def _move_aside_then_in(new: Path, target: Path, old: Path) -> Path:
    """Rename ``target`` to ``old``, then ``new`` to ``target``; return ``old``.

    Between the two renames ``target`` is missing: :func:`recover` repairs a crash there.
    """
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def recover(target: str | os.PathLike[str], leftovers: Leftovers | None = None) -> None:
    """Repair what a crashed replace of ``target`` left behind; a no-op when nothing was left.

    For each proven journal of a dead writer (module docstring): if ``target`` is missing, the
    previous version it moved aside becomes ``target`` again; then its staging directory and
    previous version are removed, and the journal last. Unproven directories are never touched;
    failures (a read-only directory, a concurrent recovery) are ignored. ``leftovers``: the journals
    as that listing of the directory found them (:class:`Leftovers`).
    """
    target = Path(target)
    for journal in _dead_journals(target, leftovers):
        with contextlib.suppress(OSError):
            _repair(journal)


def _repair(journal: _Journal) -> None:
    old, recorded = journal.sibling("old"), journal.owned.get("old")
    if recorded is not None and not os.path.lexists(journal.target) and _identity(old) == recorded:
        os.rename(old, journal.target)
        _fsync_directory(journal.target.parent)
    _clean(journal)


def _clean(journal: _Journal) -> None:
    """Remove what the write ``journal`` records at its ``.tmp`` and ``.old`` names: its staging directory, its
    previous version as the write discards it (:func:`_discard_previous`), an unrecorded directory only if
    empty, its temporary file (:func:`_remove_temporary_file`); then the journal, once nothing is left there."""
    _remove_temporary_file(journal)
    for path in (journal.sibling("tmp"), journal.sibling("old")):
        identity = _identity(path)
        if identity is None:
            continue
        if identity == journal.owned.get("old"):
            _discard_previous(path, journal)
        elif identity == journal.owned.get("staging"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only ever removes an empty directory
    if not any(
        os.path.lexists(path) for path in (journal.sibling("tmp"), journal.sibling("old"), journal.temporary_file())
    ):
        journal.close()


def _remove_temporary_file(journal: _Journal) -> None:
    """Remove the regular file at the temporary file name of the file write ``journal`` (never a link) when it is
    the one the journal records, or, when the journal records none (a crash between creating it and recording
    it), when it is empty: removing an empty file cannot lose data."""
    path = journal.temporary_file()
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        recorded = journal.owned.get("file")
        if stat.S_ISREG(info.st_mode) and (
            (info.st_dev, info.st_ino) == recorded or (not recorded and not info.st_size)
        ):
            os.unlink(path)


def interrupted_write(target: str | os.PathLike[str]) -> Path | None:
    """The previous version of a missing ``target`` that a dead writer moved aside, if any (nothing moves).

    Reads (loading a bundle, ``trainfer predict``) call this to explain a missing path; only a
    write of ``target`` (or an explicit :func:`recover`) puts the previous version back.
    """
    target = Path(target)
    if os.path.lexists(target):
        return None
    for journal in _dead_journals(target):
        old = journal.sibling("old")
        if journal.owned.get("old") is not None and _identity(old) == journal.owned["old"]:
            return old
    return None


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


def _rename2(first: Path, second: Path, flags: int) -> int | None:
    """``renameat2(first, second, flags)``: 0, or the ``errno`` it failed with; ``None`` where the system has no
    such call or the file system does not support ``flags``."""
    function = _renameat2()
    if function is None:
        return None
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), flags) == 0:
        return 0
    code = ctypes.get_errno()
    return None if code in _UNSUPPORTED else code


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; ``False`` where the system or file system cannot."""
    code = _rename2(first, second, _RENAME_EXCHANGE)
    if code:
        raise OSError(code, os.strerror(code), str(second))
    return code == 0


def _rename_noreplace(source: Path, destination: Path) -> bool:
    """Rename ``source`` to ``destination`` unless something exists there (then ``False``). Atomic where
    ``renameat2`` has ``RENAME_NOREPLACE``; elsewhere checked just before the rename, which could then
    replace only an empty directory made in between."""
    code = _rename2(source, destination, _RENAME_NOREPLACE)
    if code is None:
        if os.path.lexists(destination):
            return False
        os.rename(source, destination)
        return True
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if code:
        raise OSError(code, os.strerror(code), str(destination))
    return True


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
def atomic_directory(target: str | os.PathLike[str], own: OwnFiles | None = None) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``target``, on failure it is removed.

    Callers decide beforehand whether an existing directory ``target`` may be replaced at all; one
    that exists and is not a directory (links followed) is always refused (:func:`replace_directory`,
    which ``own`` is passed to). An ``OSError`` while writing becomes a :class:`WriteError` naming ``target``.
    """
    target = Path(target)
    with _naming_failures(target):
        staging = staging_directory(target)
        try:
            yield staging
            replace_directory(staging, target, own)
        except BaseException:
            remove_staging(staging)
            raise
