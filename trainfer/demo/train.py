"""A small, correct training loop: modes through trainfer's contexts, exact resume, DDP under torchrun.

:func:`fit` trains for whole epochs. Each epoch runs under :func:`trainfer.training` and is
evaluated under :func:`trainfer.inference`, so the caller's per-module modes are the same after
``fit`` as before. Every source of randomness is drawn from ``(seed, epoch, rank)`` at the start of
the epoch: the training sampler and dataset get ``set_epoch(epoch)`` and the torch generator (Dropout)
is re-seeded (the global generator). Resuming from the checkpoint written after epoch ``k`` therefore replays epochs
``k+1...`` exactly as an uninterrupted run would.

A model's training forward may return a tensor of logits or a dict with ``"logits"`` and
auxiliary heads' logits (any other entries); the objective is

    loss(logits, y) + aux_weight * sum(loss(aux, y) for each auxiliary entry)

Under ``torchrun`` the model is wrapped in ``DistributedDataParallel``; sums of losses, correct
predictions and sample counts are reduced across ranks before dividing, and only rank 0 writes
files (checkpoint, best bundle) or shows progress. After each epoch rank 0's BatchNorm statistics
are copied to every rank, so all ranks evaluate and save the same model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainfer.atomic import atomic_file
from trainfer.errors import BundleError, InputError, InputTypeError
from trainfer.modes.contexts import inference, training
from trainfer.serve import distributed
from trainfer.serve.weights import write_safetensors

Loss = Callable[[Tensor, Tensor], Tensor]
_STATE_KEY = "trainfer.checkpoint"


@dataclass
class FitResult:
    """Per-epoch ``history`` (train/val loss and accuracy, seconds) and the best validation epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_accuracy: float = -math.inf
    best_val_loss: float = math.inf

    def improved_by(self, record: Mapping[str, float]) -> bool:
        """Higher validation accuracy, or equal accuracy with lower validation loss."""
        return (record["val_accuracy"], -record["val_loss"]) > (self.best_val_accuracy, -self.best_val_loss)


def logits_of(output: Any) -> Tensor:
    """The main prediction of a forward's output: the tensor itself, or a dict's ``"logits"``."""
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise InputError(f"a forward returning a dict needs a 'logits' entry; got keys {sorted(output)}")
        return output["logits"]
    if not isinstance(output, Tensor):
        raise InputTypeError(
            f"expected the forward to return a tensor or a dict of tensors; got {type(output).__name__}"
        )
    return output


def objective(output: Any, targets: Tensor, loss: Loss, aux_weight: float) -> Tensor:
    """``loss(logits) + aux_weight * sum(loss(aux))`` over a dict output's auxiliary entries."""
    total = loss(logits_of(output), targets)
    if isinstance(output, Mapping):
        for name, aux in output.items():
            if name != "logits":
                total = total + aux_weight * loss(aux, targets)
    return total


def evaluate(model: nn.Module, loader: DataLoader, loss: Loss = F.cross_entropy) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` under :func:`trainfer.inference`, reduced over ranks."""
    device = _device_of(model)
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    with inference(model):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = logits_of(model(inputs))
            sums["loss"] += float(loss(logits, targets)) * len(targets)
            sums["correct"] += float((logits.argmax(1) == targets).sum())
            sums["count"] += len(targets)
    return _means(distributed.all_reduce_sum(sums, device))


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    loss: Loss = F.cross_entropy,
    *,
    aux_weight: float = 0.4,
    scheduler: Any = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    best_bundle: str | os.PathLike | None = None,
    bundle_metadata: Mapping[str, Any] | None = None,
    sync_batchnorm: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` (in place) for ``epochs`` epochs; return the history and the best epoch.

    ``checkpoint``: a ``.safetensors`` file rewritten atomically after every epoch with the model,
    optimizer and scheduler state (tensors as safetensors, the rest as JSON; nothing pickled); with
    ``resume`` training continues after the epoch it holds. ``best_bundle``: a path where
    ``trainfer.save(model, best_bundle, **bundle_metadata)`` writes the model whenever validation
    improves. ``scheduler`` (if given) steps once per epoch. ``sync_batchnorm`` converts the
    model's BatchNorm layers to ``SyncBatchNorm`` in place before wrapping in DDP (CUDA only).
    """
    if epochs < 0:
        raise InputError(f"epochs must be >= 0; got {epochs}")
    result = FitResult()
    if checkpoint is not None and resume and Path(checkpoint).exists():
        result = load_checkpoint(checkpoint, model, optimizer, scheduler)
    net = _parallel(model, sync_batchnorm)
    device = _device_of(model)
    for epoch in range(len(result.history), epochs):
        started = time.perf_counter()
        _seed_epoch(train_loader, seed, epoch)
        bar = tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=None if progress and distributed.is_main() else True,  # None: off when not a terminal
        )
        with training(net):
            train = _train_epoch(net, train_loader, optimizer, loss, aux_weight, device, bar)
        distributed.broadcast_buffers(model)
        val = evaluate(model, val_loader, loss)
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch + 1, "train_loss": train["loss"], "train_accuracy": train["accuracy"]}
        record |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": time.perf_counter() - started}
        bar.set_postfix(loss=f"{train['loss']:.4f}", val_acc=f"{val['accuracy']:.2%}")
        bar.close()
        _record(result, record, model, best_bundle, bundle_metadata)
        if checkpoint is not None and distributed.is_main():
            save_checkpoint(checkpoint, model, optimizer, scheduler, result)
        distributed.barrier()
    return result


def _train_epoch(
    net: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss: Loss,
    aux_weight: float,
    device: torch.device,
    bar: tqdm,
) -> dict[str, float]:
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        output = net(inputs)
        total = objective(output, targets, loss, aux_weight)
        total.backward()
        optimizer.step()
        sums["loss"] += float(total.detach()) * len(targets)
        sums["correct"] += float((logits_of(output).argmax(1) == targets).sum())
        sums["count"] += len(targets)
        bar.update()
        bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.4f}")
    return _means(distributed.all_reduce_sum(sums, device))


def _means(sums: Mapping[str, float]) -> dict[str, float]:
    if sums["count"] == 0:
        raise InputError("no samples: the data loader is empty")
    return {"loss": sums["loss"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}


def _record(
    result: FitResult,
    record: dict[str, float],
    model: nn.Module,
    best_bundle: str | os.PathLike | None,
    bundle_metadata: Mapping[str, Any] | None,
) -> None:
    result.history.append(record)
    if not result.improved_by(record):
        return
    result.best_epoch, result.best_val_accuracy, result.best_val_loss = (
        int(record["epoch"]),
        record["val_accuracy"],
        record["val_loss"],
    )
    if best_bundle is not None and distributed.is_main():
        from trainfer.serve.bundle import save

        save(model, best_bundle, **dict(bundle_metadata or {}))


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the epoch's shuffling, augmentation and Dropout a function of ``(seed, epoch, rank)``."""
    for source in (loader.sampler, loader.dataset):
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)
    torch.manual_seed((seed * 1_000_003 + epoch) * 1_009 + distributed.rank())


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _parallel(model: nn.Module, sync_batchnorm: bool) -> nn.Module:
    """``model`` itself in a single process; wrapped in DDP under torchrun."""
    if sync_batchnorm and _device_of(model).type != "cuda":
        raise InputError("sync_batchnorm needs a CUDA model: SyncBatchNorm cannot train on CPU")
    if distributed.world_size() == 1:
        return model
    if sync_batchnorm:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = _device_of(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


# ------------------------------------------------------------------ checkpoints (no pickle)
def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, result: FitResult
) -> Path:
    """Write model, optimizer, scheduler and history to one ``.safetensors`` file, atomically."""
    tensors: dict[str, Tensor] = {}
    state = {
        "model": _encode(model.state_dict(), "model", tensors),
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors) if scheduler is not None else None,
        "result": _encode(vars(result), "result", tensors),
    }
    path = Path(path)
    with atomic_file(path) as tmp:
        write_safetensors(tensors, tmp, metadata={_STATE_KEY: json.dumps(state)})
    return path


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
) -> FitResult:
    """Restore what :func:`save_checkpoint` wrote into ``model``/``optimizer``/``scheduler``."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as error:
        raise BundleError(f"cannot read checkpoint {str(path)!r}: {error}") from None
    if _STATE_KEY not in metadata:
        raise BundleError(f"{str(path)!r} is not a trainfer checkpoint: no {_STATE_KEY!r} metadata")
    state = json.loads(metadata[_STATE_KEY])
    weights = _decode(state["model"], tensors)
    _check_weights(model.state_dict(), weights, path)
    model.load_state_dict(weights)
    optimizer.load_state_dict(_decode(state["optimizer"], tensors))
    if (scheduler is None) != (state["scheduler"] is None):
        raise BundleError(
            f"checkpoint {str(path)!r} was written {'with' if scheduler is None else 'without'} a scheduler"
        )
    if scheduler is not None:
        scheduler.load_state_dict(_decode(state["scheduler"], tensors))
    return FitResult(**_decode(state["result"], tensors))


def _check_weights(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(given[key].shape)}"
        for key in sorted(set(expected) & set(given))
        if expected[key].shape != given[key].shape
    ]
    if missing or unexpected or shapes:
        raise BundleError(
            f"checkpoint {str(path)!r} does not match the model: missing {missing}, unexpected {unexpected}, "
            f"mis-shaped {shapes}"
        )


def _encode(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of nested dicts/lists/tuples/scalars; tensors move to ``tensors[name]``."""
    if isinstance(value, Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(value, Mapping):
        return {"dict": [[key, _encode(item, f"{name}.{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, tuple | list):
        encoded = [_encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]
        return {"tuple": encoded} if isinstance(value, tuple) else encoded
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise InputTypeError(
        f"cannot checkpoint {type(value).__name__} at {name!r}: only tensors, numbers, strings, lists, dicts"
    )


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "tuple" in value:
        return tuple(_decode(item, tensors) for item in value["tuple"])
    return {key: _decode(item, tensors) for key, item in value["dict"]}
