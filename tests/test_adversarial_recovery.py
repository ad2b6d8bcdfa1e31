"""Crash recovery, attacked by a user who read docs/security.md: it may only ever touch what trainfer made.

Each test is one attack on :mod:`trainfer.atomic`'s recovery (the journal, its names, its proofs)
through the public API and the command line. What must hold: no directory or file trainfer did
not make is deleted, moved or served; a read never moves anything; what a killed trainfer left is
still repaired by the next write; hostile journals cost bounded time and memory.
"""

import functools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_atomic import crash_replace
from time_limit import time_limit

import trainfer
from trainfer import atomic
from trainfer.atomic import recover, staging_directory
from trainfer.cli import main
from trainfer.models import digits_net

TOKEN = "0123456789abcdef" * 2
# Children import trainfer.atomic without the package's __init__ (no torch: they start fast).
PRELUDE = f"""
import sys, types
package = types.ModuleType("trainfer")
package.__path__ = [{str(Path(atomic.__file__).parent)!r}]
sys.modules["trainfer"] = package
"""


def user_directory(path: Path, content: str = "mine") -> Path:
    """A user's own directory with a file in it."""
    path.mkdir()
    (path / "notes.txt").write_text(content)
    return path


def intact(path: Path, content: str = "mine") -> bool:
    return path.is_dir() and (path / "notes.txt").read_text() == content


@functools.cache
def dead_pid() -> int:
    """The process id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def forged_journal(target: Path, token: str = TOKEN, **changes) -> Path:
    """A journal as a dead trainfer writer would have left it (``changes`` edit its header or records)."""
    header = {"format": "trainfer-recovery", "version": 1, "token": token, "target": target.name}
    header |= {"pid": dead_pid(), "host": socket.gethostname()} | changes.pop("header", {})
    records = changes.pop("records", [])
    path = target.parent / f".{target.name}.trainfer-{token}.journal"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in [header, *records]))
    return path


def identity(path: Path) -> list[int]:
    info = os.lstat(path)
    return [info.st_dev, info.st_ino]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    return trainfer.save(digits_net().eval(), tmp_path_factory.mktemp("source") / "digits")


# --------------------------------------------------------------------------- the user's own directories
@pytest.mark.parametrize("names", [[".mybundle.backup.old", ".mybundle.notes.tmp"]])
def test_deploy_and_save_leave_the_users_old_and_tmp_directories(bundle, tmp_path, names):
    own = [user_directory(tmp_path / name) for name in names]
    result = CliRunner().invoke(main, ["deploy", str(bundle), "-o", str(tmp_path / "mybundle")])
    assert result.exit_code == 0, result.output
    trainfer.save(digits_net().eval(), tmp_path / "mybundle")
    assert all(intact(path) for path in own)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mybundle", *names])


def test_predict_of_a_missing_bundle_neither_moves_nor_serves_the_users_old_copy(bundle, tmp_path):
    import shutil

    decoy = tmp_path / ".missing.backup.old"
    shutil.copytree(bundle, decoy)  # a valid bundle: served if recovery renamed it
    png = tmp_path / "x.png"
    from serving_models import write_pngs

    write_pngs(tmp_path / "images", 1)
    shutil.copy(tmp_path / "images" / "img00000.png", png)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "missing"), str(png)])
    assert result.exit_code == 2 and "no trainfer bundle" in result.output, result.output
    assert not (tmp_path / "missing").exists() and (decoy / "manifest.json").is_file()


@pytest.mark.parametrize(
    "name",
    [
        ".b.{pid}-abcd1234.tmp",  # what trainfer 0.1 named a staging directory, with a dead pid
        ".b.{pid}-" + "0" * 32 + ".old",
        ".b." + "a" * 32 + ".old",  # no pid at all: 0.1 took it for a dead writer's
        ".b.trainfer-" + TOKEN + ".old",  # today's name, but no journal
        ".b.trainfer-" + TOKEN + ".tmp",
        ".b.trainfer-" + TOKEN.upper() + ".old",
        ".b.trainfer-" + TOKEN + ".old\n",
        ".b.trainfer-" + TOKEN[:-1] + ".old",
    ],
)
def test_names_alone_prove_nothing(tmp_path, name):
    own = user_directory(tmp_path / name.format(pid=dead_pid()))
    recover(tmp_path / "b")  # the target is missing: the most tempting case
    trainfer.save(digits_net().eval(), tmp_path / "b")
    assert intact(own) and (tmp_path / "b" / "manifest.json").is_file()


def journal_attacks(tmp_path: Path) -> dict[str, Path]:
    """Forged journals next to a user's directory at a journaled name; each must leave it alone."""
    target = tmp_path / "b"
    own = user_directory(tmp_path / f".b.trainfer-{TOKEN}.old")
    mine = {"records": [{"old": identity(own)}]}
    cases = {
        "live writer (this process)": {"header": {"pid": os.getpid()}},
        "another host": {"header": {"host": "elsewhere.example"}},
        "pid 0": {"header": {"pid": 0}},
        "pid as a string": {"header": {"pid": str(dead_pid())}},
        "no host": {"header": {"host": None}},
        "another target": {"header": {"target": "c"}},
        "another token in the header": {"header": {"token": "f" * 32}},
        "another format": {"header": {"format": "mine"}},
        "version 2": {"header": {"version": 2}},
        "identity of another directory": {"records": [{"old": identity(tmp_path)}]},
        "identity as strings": {"records": [{"old": [str(v) for v in identity(own)]}]},
        "identity as floats": {"records": [{"old": [float(v) for v in identity(own)]}]},
        "no identity": {"records": []},
    }
    return {label: (target, own, {**mine, **changes}) for label, changes in cases.items()}


def test_forged_journals_are_not_proofs(tmp_path):
    for label, (target, own, changes) in journal_attacks(tmp_path).items():
        journal = forged_journal(target, **changes)
        recover(target)
        assert atomic.interrupted_write(target) is None, label
        assert intact(own) and not target.exists(), label
        journal.unlink()


def test_a_journal_that_is_a_link_a_directory_or_someone_elses_proves_nothing(tmp_path):
    target = tmp_path / "b"
    own = user_directory(tmp_path / f".b.trainfer-{TOKEN}.old")
    real = forged_journal(tmp_path / "elsewhere", records=[{"old": identity(own)}])
    link = tmp_path / f".b.trainfer-{TOKEN}.journal"
    real.write_text(real.read_text().replace('"elsewhere"', '"b"'))
    link.symlink_to(real)
    recover(target)
    assert intact(own) and not target.exists()
    link.unlink()
    link.mkdir()
    recover(target)
    assert intact(own) and not target.exists()


def test_a_link_at_a_journaled_name_is_never_followed(tmp_path):
    target = tmp_path / "b"
    own = user_directory(tmp_path / "elsewhere")
    link = tmp_path / f".b.trainfer-{TOKEN}.old"
    link.symlink_to(own, target_is_directory=True)
    forged_journal(target, records=[{"old": identity(own)}])  # the identity of what the link points to
    recover(target)
    trainfer.save(digits_net().eval(), target)
    assert intact(own) and link.is_symlink()


def test_a_directory_swapped_in_after_the_crash_is_not_the_one_recorded(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "content").write_text("old")
    assert not crash_replace(target, 7, "after", "fallback")  # killed between the two renames
    (old,) = tmp_path.glob(".bundle.trainfer-*.old")
    old.rename(tmp_path / "kept")  # the user moves trainfer's copy away and puts their own there
    own = user_directory(old)
    recover(target)
    assert intact(own) and not target.exists() and (tmp_path / "kept" / "content").read_text() == "old"


# --------------------------------------------------------------------------- what trainfer made is still repaired
def test_a_writer_killed_with_sigkill_is_cleaned_up_by_the_next_write(tmp_path):
    target = tmp_path / "b"
    trainfer.save(digits_net().eval(), target)
    child = PRELUDE + textwrap.dedent(
        f"""
        import os, signal
        from trainfer.atomic import staging_directory
        staging = staging_directory({str(target)!r})
        (staging / "half").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".b.trainfer-*"))) == 2  # its staging directory and journal
    trainfer.save(digits_net().eval(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_read_reports_an_interrupted_write_and_moves_nothing(tmp_path):
    target = tmp_path / "b"
    trainfer.save(digits_net().eval(), target)
    assert not crash_replace(target, 7, "after", "fallback")
    before = sorted(p.name for p in tmp_path.iterdir())
    for read in (trainfer.load, trainfer.Predictor.load, trainfer.serve.bundle.read_manifest):
        with pytest.raises(trainfer.BundleError, match="interrupted"):
            read(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    trainfer.save(digits_net().eval(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_live_writer_in_this_process_is_never_touched(tmp_path):
    staging = staging_directory(tmp_path / "b")
    (staging / "work").write_text("in progress")
    recover(tmp_path / "b")
    trainfer.save(digits_net().eval(), tmp_path / "b")
    assert (staging / "work").read_text() == "in progress"
    atomic.remove_staging(staging)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --------------------------------------------------------------------------- bombs
BOMB = (
    PRELUDE
    + """
import resource, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))  # 2 GiB: reading the bomb would fail
from trainfer.atomic import recover
start = time.perf_counter()
recover(sys.argv[1])
print(time.perf_counter() - start)
"""
)


def test_hostile_journals_cost_bounded_time_and_memory(tmp_path):
    target = tmp_path / "b"
    own = user_directory(tmp_path / f".b.trainfer-{TOKEN}.old")
    with open(tmp_path / f".b.trainfer-{'1' * 32}.journal", "wb") as handle:
        handle.truncate(1 << 34)  # 16 GiB (sparse): never read
    (tmp_path / f".b.trainfer-{'2' * 32}.journal").write_text("[" * 4000 + "]" * 4000)  # deep nesting
    (tmp_path / f".b.trainfer-{'3' * 32}.journal").write_bytes(b"\xff\xfe" * 100)  # not UTF-8
    for index in range(500):  # many journals, each well formed and proving nothing
        forged_journal(target, token=f"{index:032x}", records=[{"old": identity(tmp_path)}])
    with time_limit(120):
        done = subprocess.run(
            [sys.executable, "-c", BOMB, str(target)],
            capture_output=True,
            text=True,
            timeout=110,
        )
    assert done.returncode == 0, done.stderr
    assert intact(own) and not target.exists()
    assert resource.getrlimit(resource.RLIMIT_AS)  # the limit applied to the child only


def test_a_write_onto_a_link_to_a_bundle_replaces_the_link_and_leaves_nothing_beside_it(tmp_path):
    """Found by a docs-only attacker: the link moved aside stayed as a staging-named leftover."""
    import torch
    from torch import nn

    import trainfer

    model, x = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 4)
    victim = tmp_path / "victim"
    trainfer.save(model, victim, factory="torch.nn:Identity", example_inputs=x)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    (tmp_path / "lnk").symlink_to("victim")
    trainfer.save(model, tmp_path / "lnk", factory="torch.nn:Identity", example_inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lnk", "victim"]
    assert (tmp_path / "lnk").is_dir() and not (tmp_path / "lnk").is_symlink()
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
