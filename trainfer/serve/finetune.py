"""The built-in fine-tuning loop (``trainfer prune --finetune-epochs``): cross-entropy on labelled inputs.

:class:`FinetuneLoop` is a ``finetune`` callable for :func:`trainfer.prune`: called with a model, it
trains it in place, in one process, on the model's device:

* objective: the mean cross-entropy of the model's (first) output against class indices;
* ``epochs`` passes over the inputs in shuffled mini-batches of ``batch_size`` (the order drawn from
  ``seed``, so a run is repeatable);
* optimizer: ``"adam"`` (Adam, default ``lr=1e-3``) or ``"sgd"`` (SGD with momentum 0.9); no
  schedule, no weight decay, no augmentation (your own loop, passed as ``finetune=``, can do more);
* ``progress(record)`` after each epoch, with the epoch's mean loss and training accuracy.

A loss that stops being finite raises :class:`~trainfer.errors.NonFiniteError` (lower the
learning rate) rather than handing a broken model to the gate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainfer.errors import InputError, NonFiniteError
from trainfer.serve.calibration import label_column
from trainfer.serve.outputs import flatten_outputs

__all__ = ["OPTIMIZERS", "EpochRecord", "FinetuneLoop"]

#: ``optimizer=`` name -> how the optimizer is built from the parameters and the learning rate.
OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "adam": lambda parameters, lr: torch.optim.Adam(parameters, lr=lr),
    "sgd": lambda parameters, lr: torch.optim.SGD(parameters, lr=lr, momentum=0.9),
}


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of fine-tuning: its number (from 1), of how many, mean loss and training accuracy."""

    epoch: int
    epochs: int
    loss: float
    accuracy: float

    def __str__(self) -> str:
        return (
            f"fine-tuning epoch {self.epoch}/{self.epochs}: loss {self.loss:.4f}, training accuracy {self.accuracy:.2%}"
        )


@dataclass(frozen=True)
class FinetuneLoop:
    """Train a model in place on ``inputs`` ``(N, ...)`` and ``labels`` ``(N,)`` class indices (see the module;
    ``(N, 1)`` is read as ``(N,)``, as every gate reads labels: :func:`~trainfer.serve.calibration.label_column`)."""

    inputs: Tensor
    labels: Tensor
    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    seed: int = 0
    progress: Callable[[EpochRecord], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Tensor) or not self.inputs.is_floating_point() or self.inputs.dim() < 2:
            raise InputError("fine-tuning inputs must be a floating-point tensor (N, ...) of N samples")
        labels = label_column(self.labels) if isinstance(self.labels, Tensor) else self.labels
        object.__setattr__(self, "labels", labels)  # frozen: the column, read once here
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.is_complex():
            raise InputError("fine-tuning labels must be a 1-D tensor of integer class indices")
        if len(labels) != len(self.inputs) or len(labels) == 0:
            raise InputError(f"fine-tuning needs one label per input: {len(self.inputs)} inputs, {len(labels)} labels")
        if int(labels.min()) < 0:
            raise InputError(f"fine-tuning labels are class indices >= 0; got {int(labels.min())}")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise InputError(f"fine-tuning {name} must be an int >= {0 if name == 'epochs' else 1}; got {value!r}")
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"fine-tuning lr must be a positive finite number; got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"fine-tuning optimizer must be one of {sorted(OPTIMIZERS)}; got {self.optimizer!r}")

    def __call__(self, model: nn.Module) -> list[EpochRecord]:
        """Run the loop on ``model`` (left in training mode); return one record per epoch."""
        device = next(model.parameters()).device
        optimizer = OPTIMIZERS[self.optimizer](model.parameters(), self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        inputs, labels = self.inputs.to(device), self.labels.long().to(device)
        model.train()
        records = []
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(len(labels), generator=generator).to(device)
            loss, correct = 0.0, 0
            for batch in order.split(self.batch_size):
                batch_loss, batch_correct = self._step(model, optimizer, inputs[batch], labels[batch])
                loss, correct = loss + batch_loss * len(batch), correct + batch_correct
            records.append(EpochRecord(epoch, self.epochs, loss / len(labels), correct / len(labels)))
            if self.progress is not None:
                self.progress(records[-1])
        return records

    @staticmethod
    def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, int]:
        """One optimizer step on a mini-batch; its mean loss and how many it classified right."""
        logits = flatten_outputs(model(x))[1][0]
        if int(y.max()) >= logits.shape[-1]:
            raise InputError(f"fine-tuning labels go up to {int(y.max())}; the model has {logits.shape[-1]} classes")
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"fine-tuning loss is {float(loss.detach())}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), int((logits.detach().argmax(-1) == y).sum())
