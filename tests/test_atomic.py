"""Interrupted writes (exceptions, crashes at any step) leave what was there before, and no leftovers."""

import errno
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from nodes import NODES, kind_named, make_node, node_state
from time_limit import time_limit

from trainfer import InputError, WriteError, WriteWarning, atomic
from trainfer.atomic import atomic_directory, atomic_file, recover, staging_directory


class Interrupted(Exception):
    pass


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(Interrupted):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise Interrupted
    assert target.read_text() == "old"
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_atomic_directory_swaps_whole_directories(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            (staging / "a").write_text("half")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "old"
    with atomic_directory(target) as staging:
        (staging / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# --------------------------------------------------------------------------- crashes at every step
# The child replaces directory ``target`` (content "old") by one holding "new", and dies with
# os._exit at its K-th file-system step (rename, exchange, fsync of the directory, rmtree), before
# or after performing it (the journal's writes included). ``strategy`` "fallback" disables the exchange.
# ``own``: the writer owns only the file "content" of the directory it replaces (as a bundle write owns
# only the bundle's files). ``own`` "file": the child writes the file ``target`` instead (atomic_file). The child
# imports trainfer.atomic without the package's __init__ (no torch: it starts fast).
CHILD = f"""
import os, shutil, sys, types
from pathlib import Path
package = types.ModuleType("trainfer")
package.__path__ = [{str(Path(atomic.__file__).parent)!r}]
sys.modules["trainfer"] = package
import trainfer.atomic as atomic

target, k, when, strategy, own = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
calls = [0]

def step(function):
    def run(*args, **kwargs):
        calls[0] += 1
        n = calls[0]
        if n == k and when == "before":
            os._exit(9)
        try:
            return function(*args, **kwargs)
        finally:  # after the step, even one that raised (mkdir(exist_ok=True) of an existing parent)
            if n == k and when == "after":
                os._exit(9)
    return run

os.rename = step(os.rename)
os.replace = step(os.replace)
os.mkdir = step(os.mkdir)
os.unlink = step(os.unlink)
os.rmdir = step(os.rmdir)
os.fsync = step(os.fsync)
shutil.rmtree = step(shutil.rmtree)
atomic._fsync_directory = step(atomic._fsync_directory)
atomic._exchange = step(atomic._exchange if strategy == "exchange" else (lambda first, second: False))
atomic._rename_noreplace = step(atomic._rename_noreplace)
if own == "file":
    with atomic.atomic_file(target) as tmp:
        tmp.write_text("new")
else:
    owned = (lambda directory: dict(content=atomic.FILE)) if own == "own" else None
    with atomic.atomic_directory(target, own=owned) as staging:
        (staging / "content").write_text("new")
print("completed")
"""


def crash_replace(target, k, when, strategy, own=False):
    arguments = [str(target), str(k), when, strategy, own if isinstance(own, str) else "own" if own else "all"]
    done = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 9), done.stderr
    return done.returncode == 0


@pytest.mark.parametrize("strategy", ["exchange", "fallback"])
@pytest.mark.parametrize(
    ("own", "foreign"), [(False, False), (True, False), (True, True)], ids=["whole", "own-files", "a-foreign-file"]
)
def test_a_crash_at_any_step_of_a_replace_leaves_the_old_or_the_new_directory_and_no_file_lost(
    tmp_path, strategy, own, foreign
):
    """At every crash point, after recovery, the target holds the old or the new version and nothing is left
    over. With ``foreign`` the previous version also holds "late.txt", which the writer (owning only its own
    files: ``own``) does not own, as a file written into the directory during its rewrite (M-B1): it is where
    it was (the old version still in place) or kept with the old version beside the target."""
    if strategy == "exchange" and not atomic._renameat2():
        pytest.skip("no renameat2 on this system")
    kept_name = "bundle" + atomic.KEPT_SUFFIX
    outcomes = set()
    for k in range(1, 40):
        for when in ("before", "after"):
            root = tmp_path / f"{k}{when}"
            target = root / "bundle"
            target.mkdir(parents=True)
            (target / "content").write_text("old")
            if foreign:
                (target / "late.txt").write_text("user")
            completed = crash_replace(target, k, when, strategy, own=own)
            if strategy == "exchange":
                assert target.is_dir()  # the exchange is never empty, even before recovery
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", WriteWarning)  # recovery keeps the old version as the write would
                recover(target)  # what the next write or bundle load runs first
            content = (target / "content").read_text()
            kept = [kept_name] if foreign and content == "new" else []
            assert content in ("old", "new") and sorted(p.name for p in root.iterdir()) == ["bundle", *kept]
            assert [path.read_text() for path in root.rglob("late.txt")] == (["user"] if foreign else [])
            if kept:
                assert (root / kept_name / "content").read_text() == "old"
                assert sorted(p.name for p in (root / kept_name).iterdir()) == ["content", "late.txt"]
            assert content == "new" or not completed
            outcomes.add(content)
        if completed:
            break
    assert completed and outcomes == {"old", "new"}  # every step was reached, and crashes at both ends


def test_a_crash_at_any_step_of_a_file_write_leaves_the_old_or_the_new_file_and_the_next_write_cleans_up(tmp_path):
    """A write killed with its temporary file made left ``.NAME.XXXX.tmp.SUFFIX`` beside the target for good; its
    journal now proves it trainfer's, and the next write (its :func:`recover`) removes it. A user's file of a
    look-alike name (no journal proves it) is never touched."""
    look_alike = ".report.json.1234abcd.tmp.json"
    outcomes = set()
    for k in range(1, 40):
        for when in ("before", "after"):
            root = tmp_path / f"{k}{when}"
            root.mkdir()
            (root / "report.json").write_text("old")
            (root / look_alike).write_text("mine")
            completed = crash_replace(root / "report.json", k, when, "fallback", own="file")
            with atomic_file(root / "other.json") as tmp:  # a write of another file cleans up nothing of this one
                tmp.write_text("{}")
            leftovers = sorted(p.name for p in root.iterdir())
            with atomic_file(root / "report.json") as tmp:  # the next write of the file
                tmp.write_text("next")
            assert sorted(p.name for p in root.iterdir()) == sorted(["report.json", "other.json", look_alike]), k
            assert (root / look_alike).read_text() == "mine"
            outcomes.add((completed, len(leftovers) > 3))
        if completed:
            break
    assert completed and (False, True) in outcomes  # some crashes left files behind, all cleaned up


def test_a_file_at_the_temporary_name_of_a_killed_write_is_kept_unless_it_is_the_one_recorded(tmp_path):
    """The journal proves the temporary file by its identity: one replaced by a user's own file keeps both."""
    target = tmp_path / "report.json"
    # steps: 1 makes the parent, 2 syncs the temporary file (a file write's journal is not synced), 3 renames it
    assert not crash_replace(target, 3, "before", "fallback", own="file")
    (temporary,) = tmp_path.glob(".report.json.trainfer-*.tmp.json")
    assert temporary.read_text() == "new"
    (tmp_path / "mine").write_text("mine")
    os.replace(tmp_path / "mine", temporary)  # another file (made while the first exists: another inode), same name
    recover(target)
    assert temporary.read_text() == "mine" and len(list(tmp_path.iterdir())) == 2  # the file and its journal
    temporary.unlink()
    recover(target)
    assert list(tmp_path.iterdir()) == []  # nothing left to prove: the journal goes


@pytest.mark.parametrize("strategy", ["exchange", "fallback"])
def test_a_file_written_into_the_directory_during_its_replace_is_kept_with_the_previous_version(
    tmp_path, monkeypatch, strategy
):
    """M-B1: a file someone writes into the directory after the writer's check, the instant before the swap,
    is never deleted: the previous version is kept whole beside the target, and a one-line warning names both."""
    if strategy == "exchange" and not atomic._renameat2():
        pytest.skip("no renameat2 on this system")
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "content").write_text("old")
    exchange = atomic._exchange

    def user_writes_then_exchange(first, second):
        (target / "late.txt").write_text("user")  # a logger writing into its bundle while it is rewritten
        return exchange(first, second) if strategy == "exchange" else False

    monkeypatch.setattr(atomic, "_exchange", user_writes_then_exchange)
    kept = "bundle" + atomic.KEPT_SUFFIX
    for previous, name in (("old", kept), ("new", kept + "-2")):  # a second kept version takes a free name
        warned = r"'.*bundle' was rewritten, but it held 'late.txt' besides its writer's files \(put there before or"
        kept_in = rf" during the rewrite\): nothing was deleted, the previous version is kept with them in '.*/{name}'$"
        with pytest.warns(WriteWarning, match=warned + kept_in):
            with atomic_directory(target, own=lambda directory: {"content": atomic.FILE}) as staging:
                (staging / "content").write_text("new")
        assert (tmp_path / name / "late.txt").read_text() == "user"
        assert (tmp_path / name / "content").read_text() == previous
        assert sorted(p.name for p in target.iterdir()) == ["content"] and (target / "content").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", kept, kept + "-2"]


@pytest.mark.parametrize("strategy", ["exchange", "fallback"])
def test_an_interrupt_just_after_the_swap_cleans_up_without_deleting_a_file_the_writer_does_not_own(
    tmp_path, monkeypatch, strategy
):
    """Ctrl-C between the swap and the discard: the clean-up (with the exchange, of the staging name, which now
    holds the previous version) discards it as the write would have, never removing it whole."""
    if strategy == "exchange" and not atomic._renameat2():
        pytest.skip("no renameat2 on this system")
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "content").write_text("old")
    (target / "late.txt").write_text("user")
    if strategy == "fallback":
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    fsync_directory = atomic._fsync_directory
    interrupts = [KeyboardInterrupt]

    def interrupted_once(path):
        fsync_directory(path)
        while interrupts:
            raise interrupts.pop()

    monkeypatch.setattr(atomic, "_fsync_directory", interrupted_once)
    with pytest.raises(KeyboardInterrupt), pytest.warns(WriteWarning, match="held 'late.txt'"):
        with atomic_directory(target, own=lambda directory: {"content": atomic.FILE}) as staging:
            (staging / "content").write_text("new")
    kept = tmp_path / ("bundle" + atomic.KEPT_SUFFIX)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", kept.name]
    assert (kept / "late.txt").read_text() == "user" and (kept / "content").read_text() == "old"


def test_a_writer_owning_every_file_of_the_previous_version_removes_it_silently(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "content").write_text("old")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with atomic_directory(
            target, own=lambda directory: {"content": atomic.FILE, "missing": atomic.FILE}
        ) as staging:
            (staging / "content").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and (target / "content").read_text() == "new"


def test_a_directory_the_writer_owns_goes_with_all_it_holds_but_a_link_named_like_it_is_foreign(tmp_path):
    """A writer may own a subdirectory with all it holds (``trainfer demo`` claims one only when all it holds is its
    own); an entry of that name that is a link is not the writer's."""
    target = tmp_path / "out"
    (target / "models").mkdir(parents=True)
    (target / "models" / "a.bin").write_text("old")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with atomic_directory(target, own=lambda directory: {"models": atomic.DIRECTORY}) as staging:
            (staging / "models").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((target / "models").iterdir())
    shutil.rmtree(target / "models")
    (target / "models").symlink_to(tmp_path)
    with pytest.warns(WriteWarning, match="held 'models'"):
        with atomic_directory(target, own=lambda directory: {"models": atomic.DIRECTORY}) as staging:
            (staging / "models").mkdir()
    assert (tmp_path / ("out" + atomic.KEPT_SUFFIX) / "models").is_symlink()


@pytest.mark.parametrize(
    ("name", "written", "users"), [("content", "FILE", "directory"), ("models", "DIRECTORY", "file")]
)
def test_an_entry_of_another_type_under_an_own_name_is_the_users_and_keeps_the_previous_version(
    tmp_path, name, written, users
):
    """Only an entry of the type the writer writes under its name is the writer's: a user's directory under a bundle
    file's name (or a file under a demo directory's) was recorded and deleted with the previous version."""
    target = tmp_path / "out"
    target.mkdir()
    if users == "directory":
        (target / name).mkdir()
        (target / name / "mine.txt").write_text("user")
    else:
        (target / name).write_text("user")
    with pytest.warns(WriteWarning, match=f"held '{name}' besides its writer's files"):
        with atomic_directory(target, own=lambda directory: {name: getattr(atomic, written)}) as staging:
            (staging / "new.txt").write_text("new")
    kept = tmp_path / ("out" + atomic.KEPT_SUFFIX)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert (kept / name / "mine.txt" if users == "directory" else kept / name).read_text() == "user"


def test_the_fallback_window_is_reported_by_a_load_and_repaired_by_the_next_write(tmp_path):
    import trainfer
    from trainfer.models import digits_net

    target = tmp_path / "b"
    trainfer.save(digits_net(), target)
    before = trainfer.load(target).state_dict()
    # steps: 1-2 open and sync the journal, 3 the staging mkdir, 4 its record, 5 the old record, 6 the
    # (disabled) exchange, 7 renames the bundle aside: the crash leaves no directory at the path
    assert not crash_replace(target, 7, "after", "fallback")
    assert not target.exists() and len(list(tmp_path.glob(".b.trainfer-*.old"))) == 1
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(trainfer.BundleError, match=r"interrupted and left the previous version in '\.b\.trainfer-"):
        trainfer.load(target)  # a read explains, and moves nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == leftovers
    trainfer.save(digits_net(), tmp_path / "b")  # the next write restores, then replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    recover(target)
    assert trainfer.load(target).state_dict().keys() == before.keys()


def test_an_explicit_recover_puts_the_previous_version_back(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "content").write_text("old")
    assert not crash_replace(target, 7, "after", "fallback")
    assert not target.exists()
    recover(target)
    assert (target / "content").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    strategy = "exchange" if atomic._renameat2() else "fallback"
    # killed after the staging mkdir (empty, unrecorded), after its record, after the exchange (or its try)
    targets = {tmp_path / f"demo{k}": k for k in (3, 4, 6)}
    live = staging_directory(tmp_path / "demo4")  # this process is alive: its write is never touched
    (live / "x").write_text("live")
    for target, k in targets.items():
        target.mkdir(exist_ok=True)
        assert not crash_replace(target, k, "after", strategy)
    assert len(list(tmp_path.glob(".demo*.trainfer-*"))) == 2 * len(targets) + 2
    for target in targets:
        recover(target)  # e.g. `trainfer demo` starting again after being killed
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted(["demo3", "demo4", "demo6", live.name, live.name[: -len("tmp")] + "journal"])


def test_directories_trainfer_cannot_prove_it_made_are_never_touched(tmp_path):
    target = tmp_path / "bundle"
    names = [f".bundle.{'a' * 32}.old", ".bundle.12345-abcd.tmp", ".bundle.backup.old", ".bundle.notes.tmp"]
    for name in names:  # look like leftovers of older trainfers, or are the user's own
        (tmp_path / name).mkdir()
        (tmp_path / name / "content").write_text(name)
    recover(target)
    with atomic_directory(target) as staging:
        (staging / "content").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", *names])
    assert all((tmp_path / name / "content").read_text() == name for name in names)


def test_write_failures_name_the_target(tmp_path, monkeypatch):
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_file", full)
    with pytest.raises(WriteError, match=r"cannot write '.*report\.md': No space left on device") as caught:
        with atomic_file(tmp_path / "report.md") as tmp:
            tmp.write_text("x")
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- only files and directories are replaced
# Private nodes in tmp_path only (tests/nodes.py): never a real /dev node.
@pytest.mark.parametrize("kind", NODES)
def test_atomic_file_refuses_a_target_that_is_not_a_regular_file(tmp_path, kind):
    target = make_node(tmp_path / "out.png", kind)
    before = node_state(target)
    written = []
    with pytest.raises(InputError, match=rf"'.*out\.png' is {kind_named(kind)}: expected a new"):
        with atomic_file(target) as tmp:
            written.append(tmp)  # never reached: refused before the writer runs
    assert written == [] and node_state(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.png.")]


def test_atomic_file_checks_again_just_before_the_rename(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(InputError, match="is a pipe"):
        with atomic_file(target) as tmp:
            tmp.write_text("{}")
            os.mkfifo(target)  # appears while the writer works
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_file_replaces_a_link_to_a_regular_file_and_a_dangling_link(tmp_path):
    (tmp_path / "real").write_text("old")
    for name, points_to in (("link", "real"), ("dangling", "missing")):
        (tmp_path / name).symlink_to(tmp_path / points_to)
        with atomic_file(tmp_path / name) as tmp:
            tmp.write_text("new")
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).read_text() == "new"
    assert (tmp_path / "real").read_text() == "old"


@pytest.mark.parametrize("kind", ["regular file", *NODES])
def test_atomic_directory_refuses_a_target_that_is_not_a_directory(tmp_path, kind):
    target = tmp_path / "bundle"
    if kind == "regular file":
        target.write_text("mine")
    else:
        make_node(target, kind)
    before = node_state(target)
    with time_limit(10), pytest.raises(InputError, match=r"'.*bundle' is a .*: expected a new path or a directory"):
        with atomic_directory(target) as staging:  # a FIFO exchanged aside, then removed as a tree, hung
            (staging / "a").write_text("new")
    assert node_state(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]  # no staging, no journal


def test_replace_directory_refuses_a_file_that_appeared_at_the_target(tmp_path):
    target = tmp_path / "bundle"
    staging = staging_directory(target)
    os.mkfifo(target)  # appears after the staging directory was made
    with time_limit(10), pytest.raises(InputError, match="is a pipe: expected a new path or a directory"):
        atomic.replace_directory(staging, target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and staging.is_dir()
    atomic.remove_staging(staging)


def test_atomic_directory_replaces_a_link_to_a_directory_and_leaves_what_it_pointed_to(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a").write_text("old")
    (tmp_path / "bundle").symlink_to(tmp_path / "real")
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "a").write_text("new")
    assert not (tmp_path / "bundle").is_symlink() and (tmp_path / "bundle" / "a").read_text() == "new"
    assert (tmp_path / "real" / "a").read_text() == "old"


def test_a_target_under_a_file_is_refused_up_front_naming_why(tmp_path):
    """No write can make ``file/x.json``: the check says so before any work (bench ran its whole
    benchmark, then failed naming another reason)."""
    from trainfer.atomic import check_target
    from trainfer.errors import InputError

    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match=r"--json '.*file/x\.json' is under a file, not in a directory"):
        check_target(tmp_path / "file" / "x.json", "--json")
    check_target(tmp_path / "new" / "x.json", "--json")  # a missing parent is fine: the write makes it
    assert (tmp_path / "file").read_text() == "mine"


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_write_gives_new_files_and_directories_the_umask_modes_and_keeps_a_rewritten_ones(tmp_path, umask_022):
    """Attacker round 6 L-2: every rewrite left a bundle 0700 with 0600 files (mkstemp's and mkdir(0o700)'s
    modes), so that a server running as another user could no longer read what it served."""
    new_file, new_directory = tmp_path / "new.json", tmp_path / "bundle"
    with atomic_file(new_file) as tmp:
        tmp.write_text("{}")
    with atomic_directory(new_directory) as staging:
        (staging / "inside.txt").write_text("x")
    assert (_mode(new_file), _mode(new_directory)) == (0o644, 0o755)
    os.chmod(new_file, 0o640)
    os.chmod(new_directory, 0o750)
    with atomic_file(new_file) as tmp:
        tmp.write_text("{}")
    with atomic_directory(new_directory) as staging:
        (staging / "inside.txt").write_text("y")
    assert (_mode(new_file), _mode(new_directory)) == (0o640, 0o750)
    assert (new_directory / "inside.txt").read_text() == "y"


#: Names up to the system's 255 bytes, which the journal's own additions (about 51 bytes) would overflow if spelled
#: whole: ASCII, two-byte characters, a long "suffix" after a dot, and two names that differ only in their last byte.
LONG_NAMES = ["a" * 205, "n" * 255, "é" * 127, "€" * 85, "a." + "b" * 240]


@pytest.mark.parametrize("name", LONG_NAMES, ids=["205", "255", "two-byte", "three-byte", "long-suffix"])
def test_any_name_a_plain_write_can_create_is_written_rewritten_and_recovered(tmp_path, name):
    """A name too long to spell whole beside the target is spelled by its start and a digest; every write works,
    a killed file write's leftover is cleaned by the next write, and a killed directory write is repaired."""
    target = tmp_path / name
    for content in ("first", "second"):
        with atomic_file(target) as tmp:
            tmp.write_text(content)
    assert target.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == [name]
    assert not crash_replace(target, 3, "before", "fallback", own="file")  # killed just before its rename
    assert len(list(tmp_path.iterdir())) == 3  # the target, the temporary file and its journal
    for path in tmp_path.iterdir():  # cut between characters (round 9: ONNX Runtime refused a cut inside one)
        path.name.encode("utf-8")  # a byte of a cut character would be a surrogate here, which UTF-8 refuses
    with atomic_file(target) as tmp:
        tmp.write_text("third")
    assert target.read_text() == "third" and [p.name for p in tmp_path.iterdir()] == [name]

    missing = 0  # crashes that left the directory moved aside, the target missing, until recovery
    for k in range(1, 40):
        directory = tmp_path / f"d{k}" / name
        directory.mkdir(parents=True)
        (directory / "content").write_text("old")
        completed = crash_replace(directory, k, "after", "fallback")
        missing += not directory.exists()
        recover(directory)
        assert (directory / "content").read_text() in ("old", "new")
        assert [p.name for p in directory.parent.iterdir()] == [name]
        if completed:
            break
    assert completed and missing


def test_long_names_that_share_their_start_keep_apart(tmp_path):
    """Two names differing only past the spelled start have different digests: one's recovery never takes the
    other's leftovers."""
    first, second = tmp_path / ("x" * 250 + "1"), tmp_path / ("x" * 250 + "2")
    assert not crash_replace(first, 3, "before", "fallback", own="file")
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    with atomic_file(second) as tmp:
        tmp.write_text("two")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*leftovers, second.name])
    with atomic_file(first) as tmp:
        tmp.write_text("one")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])


def test_a_writer_of_many_files_lists_their_directory_once_and_still_recovers_what_it_finds(tmp_path, monkeypatch):
    """Each write's recovery lists the target's directory (n writes into n files: quadratic); writes sharing one
    :class:`atomic.Leftovers` list it once, and a killed write's leftover found by that listing is cleaned up."""
    assert not crash_replace(tmp_path / "005.png", 3, "before", "fallback", own="file")  # a killed earlier run
    assert len(list(tmp_path.iterdir())) == 2  # its temporary file and journal
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(atomic.os, "listdir", lambda path: listed.append(path) or real_listdir(path))
    leftovers = atomic.Leftovers()
    for i in range(10):
        with atomic_file(tmp_path / f"{i:03d}.png", leftovers) as tmp:
            tmp.write_text(str(i))
    assert listed == [tmp_path]
    for i in range(3):  # without one, every write lists the directory
        with atomic_file(tmp_path / f"{i:03d}.png") as tmp:
            tmp.write_text(str(i))
    assert listed == [tmp_path] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:03d}.png" for i in range(10)]


def test_journal_names_are_found_by_the_target_name_they_spell(tmp_path):
    """A listing files the journal names by their target's spelling (a long name's included); other names,
    look-alikes and another target's journals are not that target's."""
    token = "0" * 32
    long_name = "x" * 250
    names = [
        f".a.b.trainfer-{token}.journal",
        f".a.trainfer-{token}.journal",
        f".a.trainfer-{token}.tmp",
        f".a.trainfer-{'g' * 32}.journal",
        f".{atomic._stem(long_name)}.trainfer-{token}.journal",
        "a",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    leftovers = atomic.Leftovers()
    assert leftovers.journal_names(tmp_path / "a") == [f".a.trainfer-{token}.journal"]
    assert leftovers.journal_names(tmp_path / "a.b") == [f".a.b.trainfer-{token}.journal"]
    assert leftovers.journal_names(tmp_path / long_name) == [f".{atomic._stem(long_name)}.trainfer-{token}.journal"]
    assert leftovers.journal_names(tmp_path / "b") == []


def test_the_previous_version_of_a_long_named_directory_is_kept_under_a_name_that_fits(tmp_path):
    """A previous version holding a user's file is kept as ``NAME.previous-version-with-your-files``, ``NAME`` cut
    between characters to fit 255 bytes (round 9: a 236-byte name left it under its hidden journaled name)."""
    target = tmp_path / ("é" * 118)  # 236 bytes
    with atomic_directory(target) as staging:
        (staging / "content").write_text("old")
    (target / "mine.txt").write_text("mine")
    with pytest.warns(WriteWarning, match="previous-version-with-your-files"):
        with atomic_directory(target, own=lambda directory: {"content": atomic.FILE}) as staging:
            (staging / "content").write_text("new")
    (kept,) = [path for path in tmp_path.iterdir() if path != target]
    assert kept.name.endswith(atomic.KEPT_SUFFIX) and len(os.fsencode(kept.name)) <= 255
    assert kept.name.startswith("é" * 100) and (kept / "mine.txt").read_text() == "mine"
    assert (target / "content").read_text() == "new"
