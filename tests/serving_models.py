"""Tiny models for the serving tests (ensembles, batch and distributed prediction), saved as bundles.

Importable as ``serving_models`` from the tests (pytest puts ``tests/`` on ``sys.path``) and from
their subprocesses when ``PYTHONPATH`` holds ``tests/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import trainfer
from trainfer.testing import randomize_batchnorm

FACTORY = "serving_models:tiny_net"
TESTS = Path(__file__).parent


def tiny_net(outputs: int = 3, width: int = 4, final: str | None = None) -> nn.Module:
    """Conv-BN-ReLU, strided depthwise conv-BN-ReLU, linear on 1x8x8 inputs; ``final``: softmax/sigmoid/None."""
    layers = [
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 16, outputs),
    ]
    if final == "softmax":
        layers.append(nn.Softmax(dim=1))
    elif final == "sigmoid":
        layers += [nn.Flatten(0), nn.Sigmoid()]
    return nn.Sequential(*layers)


#: A sample whose first value is at least this is held by :class:`HeldNet` until its gate opens.
HOLD = 1000.0


class HeldNet(nn.Module):
    """:func:`tiny_net` that holds a batch containing a :data:`HOLD` sample until the file ``gate``
    exists (at most a minute), with the file ``gate.held`` present while it holds: the server tests'
    way to keep the model busy while requests queue."""

    def __init__(self, gate: str, **config):
        super().__init__()
        self.gate, self.net = Path(gate), tiny_net(**config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1)[:, 0] >= HOLD).any()):
            held = self.gate.with_suffix(".held")
            held.touch()
            deadline = time.monotonic() + 60
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            held.unlink()
        return self.net(x)


def held_net(gate: str, **config) -> nn.Module:
    return HeldNet(gate, **config)


def save_held_bundle(path: Path, seed: int, gate: Path, labels=None) -> Path:
    """A bundle of a seeded :class:`HeldNet` (non-trivial BatchNorm statistics) held by the file ``gate``."""
    torch.manual_seed(seed)
    model = HeldNet(str(gate))
    randomize_batchnorm(model.net, seed=seed)
    spec = {"input_shape": [1, 8, 8]}
    config = {"gate": str(gate)}
    return trainfer.save(
        model.eval(), path, factory="serving_models:held_net", config=config, labels=labels, preprocess=spec
    )


def trained(seed: int, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """A :func:`tiny_net` with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorm(tiny_net(**config), seed=seed).to(dtype).eval()


def save_bundle(
    path: Path, seed: int, task: str = "classification", labels=None, preprocess=None, dtype=torch.float32, **config
) -> Path:
    """Save a :func:`trained` ``dtype`` model as a bundle at ``path`` for ``task``."""
    model = trained(seed, dtype, **config)
    spec = {"input_shape": [1, 8, 8], **(preprocess or {})}
    return trainfer.save(model, path, factory=FACTORY, config=config, task=task, labels=labels, preprocess=spec)


def write_pngs(directory: Path, count: int, seed: int = 0, size: int = 8) -> list[Path]:
    """``count`` random grayscale ``size`` x ``size`` PNGs named ``img00000.png`` ... in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = directory / f"img{index:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


class Sleeping(nn.Module):
    """``inner`` made deliberately slower: each call sleeps ``seconds`` first (a known answer for timing tests)."""

    def __init__(self, inner: nn.Module, seconds: float = 0.1):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def gated_digits_bundle(root: Path, name: str = "bundle", samples: int = 48) -> tuple[nn.Module, torch.Tensor]:
    """Save a deployed ``digits_net`` (width 4, non-trivial BatchNorm statistics) as ``root/name``, with
    gate data beside it: ``x.npy`` (``samples`` random inputs), ``y.npy`` (the model's own labels for
    them) and ``y5.npy`` (the labels of the first five, a deliberate mismatch). Returns (model, inputs)."""
    from trainfer.models import digits_net

    torch.manual_seed(0)
    deployed = trainfer.deploy(randomize_batchnorm(digits_net(width=4)).eval(), torch.randn(2, 1, 8, 8))
    trainfer.save(deployed, root / name, task="classification", labels=list("0123456789"))
    x = torch.randn(samples, 1, 8, 8)
    with torch.no_grad():
        np.save(root / "x.npy", x.numpy())
        np.save(root / "y.npy", deployed(x).argmax(1).numpy())
        np.save(root / "y5.npy", deployed(x[:5]).argmax(1).numpy())
    return deployed, x
