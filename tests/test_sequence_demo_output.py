"""The sequence demo's output directory: all of a run or none of it, and never a user's files.

``trainfer demo --sequences --out DIR`` writes ``DIR/sequences`` through a staging directory beside it
and one atomic replace (:func:`trainfer.demo.sequences.staged_output`); an existing ``DIR/sequences``
is replaced only if it is provably an earlier output (:func:`trainfer.demo.sequences.is_output`).
Runs here train for zero epochs on a few strings: what is checked is the writing, not the learning.
"""

import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from trainfer import WriteWarning
from trainfer.atomic import KEPT_SUFFIX, recover
from trainfer.cli import main
from trainfer.demo import pipeline as demo
from trainfer.demo import sequences
from trainfer.errors import InputError

pytestmark = pytest.mark.slow  # each run deploys, verifies, scores and plots (about 6 s of CPU)

TINY = {"train_count": 32, "test_count": 8, "epochs": 0}


def snapshot(directory):
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """An earlier output of the step: ``ROOT/sequences``."""
    root = tmp_path_factory.mktemp("earlier")
    sequences.run(root / "sequences", seed=0, **TINY)
    return root


@pytest.fixture
def copy_of_earlier(earlier, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(earlier, root)
    return root


def test_a_users_files_are_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(sequences, "train_crnn", lambda *a, **k: pytest.fail("trained before checking --out"))
    mine = tmp_path / "mine" / "sequences"
    mine.mkdir(parents=True)
    (mine / "report.md").write_text("MY REPORT")
    (mine / "scores.json").write_text("MY SCORES")
    result = CliRunner().invoke(main, ["demo", "--sequences", "--out", str(mine.parent), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "refusing to replace" in result.output and "not a trainfer sequence demo output" in result.output
    assert snapshot(mine.parent) == {"sequences/report.md": b"MY REPORT", "sequences/scores.json": b"MY SCORES"}
    assert [p.name for p in mine.parent.iterdir()] == ["sequences"]  # no staging directory left
    (tmp_path / "file").write_text("a file")
    unwritable = tmp_path / "file" / "out"  # like /dev/null: --out cannot be a directory
    result = CliRunner().invoke(main, ["demo", "--sequences", "--out", str(unwritable), "--epochs", "1"])
    assert result.exit_code == 2 and "is under a file, not in a directory" in result.output
    assert (tmp_path / "file").read_text() == "a file"


def test_only_an_earlier_output_proves_itself(earlier, tmp_path):
    assert sequences.is_output(earlier / "sequences")
    assert sequences.LAYOUT.whole(earlier / "sequences")  # scores.json records every file in its bundles
    forged = tmp_path / "forged"
    shutil.copytree(earlier / "sequences", forged)
    (forged / "notes.txt").write_text("a user's file among the step's")
    assert not sequences.is_output(forged)
    (forged / "notes.txt").unlink()
    (forged / "scores.json").write_text('{"scores": {}}')
    assert not sequences.is_output(forged)
    (forged / "scores.json").write_text('{"scores": []}')
    assert sequences.is_output(forged) and not sequences.is_output(tmp_path / "missing")
    for name in forged.iterdir():
        shutil.rmtree(name) if name.is_dir() else name.unlink()
    with sequences.staged_output(forged) as work:  # an empty directory loses nothing: it may be replaced
        (work / "new").write_text("new")
    assert [p.name for p in forged.iterdir()] == ["new"]
    with pytest.raises(InputError, match="not a trainfer sequence demo output"), sequences.staged_output(forged):
        pytest.fail("entered")


def test_a_file_written_into_the_output_during_a_run_is_kept_with_the_earlier_output(copy_of_earlier):
    """Only the step's own :data:`~trainfer.demo.sequences.OUTPUTS` go: a user's file written into
    ``DIR/sequences`` while the step runs keeps the earlier output beside it, with a warning."""
    out = copy_of_earlier / "sequences"
    before = snapshot(out)
    with pytest.warns(WriteWarning, match="held 'notes.txt'"):
        with sequences.staged_output(out) as work:
            (out / "notes.txt").write_text("mine")  # the user, during the run
            (work / "scores.json").write_text('{"scores": []}')
    assert snapshot(copy_of_earlier / ("sequences" + KEPT_SUFFIX)) == {**before, "notes.txt": b"mine"}
    assert snapshot(out) == {"scores.json": b'{"scores": []}'}


def test_a_failure_while_writing_leaves_the_earlier_output_as_it_was(copy_of_earlier, monkeypatch):
    """The report is written last: by then the bundles, the plot and the scores are staged."""
    before = snapshot(copy_of_earlier)

    def fail(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(sequences, "markdown", fail)
        with pytest.raises(OSError, match="disk full"):
            sequences.run(copy_of_earlier / "sequences", seed=1, **TINY)
    assert snapshot(copy_of_earlier) == before
    assert [p.name for p in copy_of_earlier.iterdir()] == ["sequences"]
    report = sequences.run(copy_of_earlier / "sequences", seed=1, **TINY)  # an earlier output may be replaced
    assert report["plot"] == "sequences.png"  # relative to the output, never the staging directory
    after = snapshot(copy_of_earlier)
    assert after.keys() == before.keys() and after != before
    assert [p.name for p in copy_of_earlier.iterdir()] == ["sequences"]


KILLED = """
import os, signal, sys
from trainfer.demo import pipeline as demo
from trainfer.demo import sequences
from trainfer.errors import InputError

sequences.markdown = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
sequences.run(sys.argv[1], seed=1, train_count=32, test_count=8, epochs=0)
"""


def test_a_kill_while_writing_leaves_the_earlier_output_as_it_was(copy_of_earlier):
    before = snapshot(copy_of_earlier)
    out = copy_of_earlier / "sequences"
    done = subprocess.run([sys.executable, "-c", KILLED, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert snapshot(out) == {name.removeprefix("sequences/"): data for name, data in before.items()}
    left = [p.name for p in copy_of_earlier.iterdir() if p.name != "sequences"]
    assert left and all(name.startswith(".sequences.trainfer-") for name in left)  # staging and journal
    recover(out)  # what the next write of the output runs first
    assert snapshot(copy_of_earlier) == before and [p.name for p in copy_of_earlier.iterdir()] == ["sequences"]


def test_the_whole_demo_recovers_what_a_killed_sequence_run_left(copy_of_earlier):
    """A ``--sequences`` output with a killed run's leftovers beside it is still one the demo may replace."""
    done = subprocess.run([sys.executable, "-c", KILLED, str(copy_of_earlier / "sequences")], timeout=300)
    assert done.returncode == -signal.SIGKILL and len(list(copy_of_earlier.iterdir())) > 1
    with demo._staging(copy_of_earlier) as work:
        (work / "results.json").write_text("{}")
    assert [p.name for p in copy_of_earlier.iterdir()] == ["results.json"]
    assert [p.name for p in copy_of_earlier.parent.iterdir()] == ["demo"]
