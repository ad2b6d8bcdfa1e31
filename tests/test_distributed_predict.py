"""Sharded batch prediction: torchrun with 2 processes writes the single-process file byte for byte."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from serving_models import TESTS, save_bundle, write_pngs

from trainfer.cli import main
from trainfer.serve import distributed

LABELS = ["cat", "dog", "owl"]


def test_object_collectives_in_a_single_process_are_identities():
    assert distributed.all_gather_object({"lines": "a\n"}) == [{"lines": "a\n"}]
    assert distributed.broadcast_object(7) == 7


def torchrun_predict(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``trainfer predict`` under torchrun, one thread per process (torchrun's default).

    The single-process reference runs this way too: byte-identical output is promised for the
    same batches computed with the same thread count, not across thread counts.
    """
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run(
        [*command, "-m", "trainfer", "predict", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_two_processes_write_the_single_process_file_and_resume_it(tmp_path):
    bundles = [str(save_bundle(tmp_path / f"b{seed}", seed, labels=LABELS)) for seed in (0, 1)]
    images = write_pngs(tmp_path / "images", 35)  # batches of 4: the last window leaves rank 1 empty-handed
    args = [*bundles, str(images[0].parent), "--top-k", "2", "--batch-size", "4", "--out"]
    single = tmp_path / "single.jsonl"
    run = torchrun_predict(*args, str(single), processes=1)
    assert run.returncode == 0, run.stderr[-3000:]

    sharded = tmp_path / "sharded.jsonl"
    run = torchrun_predict(*args, str(sharded))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sharded.read_bytes() == single.read_bytes()
    assert len(single.read_text().splitlines()) == 35

    lines = single.read_text().splitlines(keepends=True)
    sharded.write_text("".join(lines[:10]) + lines[10][:30])  # a crash in the middle of record 11
    run = torchrun_predict(*args, str(sharded))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sharded.read_bytes() == single.read_bytes()
    assert "27 records written" in run.stderr and "after 8 already there" in run.stderr  # back to whole batches


def test_torchrun_without_out_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    bundle = save_bundle(tmp_path / "b", 0, labels=LABELS)
    image = write_pngs(tmp_path / "images", 1)[0]
    result = CliRunner().invoke(main, ["predict", str(bundle), str(image)])
    assert result.exit_code == 2 and "under torchrun give --out" in result.output
