"""Every file trainfer writes gets the mode the umask gives any new file (docs/security.md, Atomic writes).

Attacker round 10 F3: every ``.safetensors`` file was 0600 whatever the umask (safetensors writes a file of
its own and renames it over the atomic write's temporary file), so that a server running as another user
could not read the weights of a bundle it was given to serve.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from serving_models import save_bundle, trained

from trainfer.cli import main
from trainfer.demo.train import FitResult, save_checkpoint


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _write_what_a_demo_writes(out: Path) -> None:
    """A bundle, its deploy form, its int8 form (probes.safetensors), bare deployed weights and a checkpoint."""
    bundle = save_bundle(out / "bundle", seed=0, preprocess={"mean": [0.4], "std": [0.3]})
    for name, seed in (("calibration", 0), ("validation", 1)):
        np.save(out / f"{name}.npy", np.random.default_rng(seed).random((32, 1, 8, 8), dtype=np.float32))
    runner = CliRunner()
    for command in (
        ["deploy", str(bundle), "-o", str(out / "deploy")],
        ["deploy", str(bundle), "-o", str(out / "weights.safetensors")],
        ["quantize", str(out / "deploy"), "--calibration", str(out / "calibration.npy"), "-o", str(out / "int8")]
        + ["--validation", str(out / "validation.npy"), "--min-agreement", "0"],
    ):
        result = runner.invoke(main, command)
        assert result.exit_code == 0, result.output
    model = trained(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(out / "checkpoint.safetensors", model, optimizer, None, FitResult())


def test_every_file_and_directory_written_gets_the_umask_mode(tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir(mode=0o777 & ~umask)
    _write_what_a_demo_writes(out)
    modes = {str(path.relative_to(out)): stat.S_IMODE(path.stat().st_mode) for path in out.rglob("*")}
    expected = {name: 0o777 & ~umask if (out / name).is_dir() else 0o666 & ~umask for name in modes}
    assert {"bundle/model.safetensors", "int8/probes.safetensors", "checkpoint.safetensors"} <= set(modes)
    assert {name: oct(mode) for name, mode in modes.items()} == {name: oct(mode) for name, mode in expected.items()}
