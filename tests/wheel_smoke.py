"""Smoke test of the installed wheel, run from outside the repository by ``make test-wheel``.

Checks that the package works from what the wheel carries alone: the version agrees everywhere,
the command line starts, and a small deploy, bundle round trip and prediction run.
"""

import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import trainfer

installed_at = Path(trainfer.__file__).resolve()
assert "site-packages" in installed_at.parts, f"trainfer imported from {installed_at}, not from the wheel"
assert importlib.metadata.version("trainfer") == trainfer.__version__

cli = Path(sys.executable).parent / "trainfer"
printed = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=True).stdout
assert trainfer.__version__ in printed, printed

model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
with torch.no_grad():
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
x = torch.randn(2, 1, 8, 8)
deployed = trainfer.deploy(model, x)  # raises EquivalenceError unless exact

with tempfile.TemporaryDirectory() as tmp:
    bundle = Path(tmp) / "digits"
    trainfer.save(trainfer.models.digits_net(), bundle, labels=[str(d) for d in range(10)])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["versions"]["trainfer"] == trainfer.__version__, manifest["versions"]
    predictions = trainfer.Predictor.load(bundle).predict(torch.rand(3, 1, 8, 8), top_k=2)
    assert len(predictions) == 3 and all(len(p.top_k) == 2 for p in predictions)

print(f"wheel trainfer {trainfer.__version__} from {installed_at.parent}: version, CLI, deploy, bundle, predict ok")
