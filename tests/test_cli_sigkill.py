"""``kill -9`` in the middle of ``trainfer compile BUNDLE`` and ``trainfer prune BUNDLE -o OUT``.

The child runs the command and SIGKILLs itself just before its K-th file-system step (rename, replace,
fsync, mkdir, unlink, rmdir, rmtree: as tests/test_atomic.py's crash_replace counts them), for K spread
over the steps a complete run takes, the last one included (every K would cost a fresh interpreter each;
tests/test_atomic.py covers every step of the atomic replace itself). What must hold after each kill:
the user's files are byte for byte what they were, and the output is either absent, refused with a
clear error, or the complete output (the same as an uninterrupted run's); never a half-written one that reads as valid.
"""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from serving_models import gated_digits_bundle

import trainfer
from trainfer.cli import main
from trainfer.errors import TrainferError
from trainfer.serve import runtime as rt

pytestmark = pytest.mark.slow  # a fresh interpreter (torch, the command) per file-system step

# argv: K (0: never killed; prints the number of steps) then the command line.
CHILD = """
import json, os, shutil, signal, sys
import trainfer.cli, trainfer.serve.gated, trainfer.serve.prune, trainfer.serve.bundle  # imported before counting

k, arguments = int(sys.argv[1]), sys.argv[2:]
calls = [0]

def step(function):
    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return run

for name in ("rename", "replace", "fsync", "mkdir", "unlink", "rmdir"):
    setattr(os, name, step(getattr(os, name)))
shutil.rmtree = step(shutil.rmtree)
try:
    trainfer.cli.main(arguments, standalone_mode=False)
finally:
    print(json.dumps({"steps": calls[0]}), file=sys.stderr)
"""


# argv: the command line; the child SIGKILLs itself just before renaming its temporary file over runtime.json.
KILLED_BEFORE_RUNTIME_RENAME = """
import os, signal, sys
import trainfer.cli

replace = os.replace

def killed_before_runtime(source, target, *args, **kwargs):
    if os.path.basename(target) == "runtime.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, target, *args, **kwargs)

os.replace = killed_before_runtime
trainfer.cli.main(sys.argv[1:], standalone_mode=False)
"""


def run_killed(k: int, *arguments) -> subprocess.CompletedProcess:
    """The command run in a child killed before its ``k``-th file-system step (``k=0``: never)."""
    command = [sys.executable, "-c", CHILD, str(k), *(str(a) for a in arguments)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def spread(steps: int, points: int = 5) -> list[int]:
    """Up to ``points`` steps among 1..``steps``, evenly spread, the first and the last included."""
    return sorted({1 + round(i * (steps - 1) / (points - 1)) for i in range(points)})


def files(directory):
    """Every file under ``directory`` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def steps_of(done: subprocess.CompletedProcess) -> int:
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stderr.strip().splitlines()[-1])["steps"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A deployed classification bundle (the user's files)."""
    root = tmp_path_factory.mktemp("sigkill")
    gated_digits_bundle(root)
    return root / "bundle"


def test_a_killed_compile_leaves_the_bundle_as_it_was_or_fully_compiled(source, tmp_path):
    arguments = ("compile", "--candidates", "torch", "--rounds", "1")
    complete = shutil.copytree(source, tmp_path / "complete")
    steps = steps_of(run_killed(0, *arguments, complete))
    assert steps >= 2 and rt.read_record(complete).runtime == "torch"
    original = files(source)
    for k in spread(steps):
        bundle = shutil.copytree(source, tmp_path / f"killed{k}")
        done = run_killed(k, *arguments, bundle)
        assert done.returncode == -signal.SIGKILL, (k, done.stderr[-2000:])
        after = files(bundle)
        recorded = after.pop(rt.RUNTIME_FILE, None)
        assert {name: data for name, data in after.items() if not name.startswith(".")} == original, k
        if recorded is not None:  # written whole, or not at all
            assert rt.read_record(bundle).runtime == "torch", k
        trainfer.load(bundle)  # the user's bundle still loads


def test_a_killed_prune_leaves_the_source_untouched_and_no_half_written_output(source, tmp_path):
    def arguments(out):
        return ("prune", source, "-o", out, "--ratio", "0.25", "--min-agreement", "0", "--max-accuracy-drop", "1")

    steps = steps_of(run_killed(0, *arguments(tmp_path / "complete")))
    reference = trainfer.load(tmp_path / "complete").state_dict()
    original = files(source)
    for k in spread(steps):
        out = tmp_path / f"killed{k}"
        done = run_killed(k, *arguments(out))
        assert done.returncode == -signal.SIGKILL, (k, done.stderr[-2000:])
        assert files(source) == original, k
        try:
            loaded = trainfer.load(out).state_dict()
        except TrainferError:  # absent, or reported as an interrupted write
            continue
        assert loaded.keys() == reference.keys(), k  # what loads is the complete output
        for name, tensor in loaded.items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=f"step {k}: {name}")


def test_the_temporary_file_a_killed_compile_left_is_removed_by_the_next_one_and_look_alikes_are_kept(source, tmp_path):
    """``trainfer compile`` killed with its ``runtime.json`` written but not yet renamed left
    ``.runtime.json.XXXX.tmp.json`` in the bundle forever (and a later ``deploy -o`` over the bundle refused it as
    someone else's file). Its journal proves it trainfer's: the next compile removes it, and files of similar
    names that no journal proves (a user's, an older trainfer's) stay."""
    bundle = shutil.copytree(source, tmp_path / "b")
    look_alikes = {".runtime.json.1234abcd.tmp.json": "older", f".runtime.json.trainfer-{'ab' * 16}.tmp.json": "mine"}
    for name, content in look_alikes.items():
        (bundle / name).write_text(content)
    arguments = ["compile", "--candidates", "torch", "--rounds", "1", str(bundle)]
    done = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RUNTIME_RENAME, *arguments], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = sorted(p.name for p in bundle.glob(".runtime.json.trainfer-*") if p.name not in look_alikes)
    token = left[0][len(".runtime.json.trainfer-") :][:32]
    assert left == [f".runtime.json.trainfer-{token}.{kind}" for kind in ("journal", "tmp.json")]
    assert not (bundle / rt.RUNTIME_FILE).exists() and (bundle / left[1]).stat().st_size > 0  # written, not renamed
    ran = CliRunner().invoke(main, arguments)
    assert ran.exit_code == 0, ran.output
    assert rt.read_record(bundle).runtime == "torch"
    assert {p.name: p.read_text() for p in bundle.iterdir() if p.name.startswith(".")} == look_alikes
