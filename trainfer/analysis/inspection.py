"""Per-layer records of what flows through a model, and where its train and eval modes part.

``inspect(model, example_inputs, modes=("train", "eval"))`` runs one forward pass per mode, each on
a deep copy of the model with the global RNG forked and seeded (so Dropout is reproducible and the
caller's model, modes, buffers and RNG state stay untouched). Every module output is reduced to
statistics as it is produced, through the one capture mechanism of :mod:`trainfer.capture`; only the
reference (eval) pass keeps its outputs, so that the train pass is compared with it on the fly:

    divergence = max |train - eval| / max |eval|        (trainfer.numerics.relative_error)

Records are in the order modules *finish* (forward hooks fire when a module returns), so the first
record above the dtype's tolerance is the first computation whose result depends on the mode: the
place a forgotten ``eval()`` starts to change the prediction.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainfer.analysis.inspection_modes import MODES, REFERENCE_MODE
from trainfer.analysis.inspection_report import Inspection, LayerRecord, Stats
from trainfer.capture import capture
from trainfer.errors import InputError, InputTypeError
from trainfer.numerics import relative_error, tolerance_for


def inspect(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Any],
    modes: str | Sequence[str] = ("eval",),
    seed: int = 0,
) -> Inspection:
    """Record every module's output statistics in each of ``modes`` (``"train"`` and/or ``"eval"``).

    ``example_inputs`` is a tensor or a tuple of positional forward arguments. Each pass runs on a
    deep copy, with the RNG seeded by ``seed`` inside a forked RNG state; the eval pass under
    ``torch.no_grad``, the train pass with gradients on, as training runs. A progress bar on a
    terminal counts the module outputs recorded.
    """
    modes = _check_modes(modes)
    inputs = as_forward_args(example_inputs)
    if "train" in modes:
        _check_train_batch(model, inputs)
    compare = len(modes) == 2
    with tqdm(desc="inspect", unit="output", disable=None) as bar:  # no total: modules run any number of times
        recorders = {mode: _Recorder(compare and mode == REFERENCE_MODE, progress=bar.update) for mode in modes}
        if compare:
            recorders["train"].reference = recorders[REFERENCE_MODE].kept
        reference_first = sorted(modes, key=lambda mode: mode != REFERENCE_MODE)
        results = {mode: _run_pass(model, inputs, mode, seed, recorders[mode]) for mode in reference_first}
    return Inspection(modes, _merge(modes, results))


class _Recorder:
    """The capture callback of one pass: reduces each output to statistics, keeping or comparing it.

    ``kept[name][k]`` holds the k-th call's tensors by leaf path when ``keep``; with a ``reference``,
    each output is compared with the same call's reference tensors. ``progress()`` is called after
    each output.
    """

    def __init__(
        self,
        keep: bool,
        reference: dict[str, list[dict[str, Tensor]]] | None = None,
        progress: Callable[[], object] = lambda: None,
    ):
        self.keep, self.reference, self.progress = keep, reference, progress
        self.kept: dict[str, list[dict[str, Tensor]]] = {}
        self.calls: Counter[str] = Counter()

    def __call__(self, name: str, module: nn.Module, output: Any) -> tuple[nn.Module, dict[str, tuple]]:
        call = self.calls[name]
        self.calls[name] += 1
        leaves = _tensor_leaves(output)
        if self.keep:
            self.kept.setdefault(name, []).append({path: value.detach().clone() for path, value in leaves})
        references = self.reference.get(name, []) if self.reference is not None else []
        peers = references[call] if call < len(references) else {}
        found = {path: (Stats.of(value), *_divergence(value, peers.get(path))) for path, value in leaves}
        self.progress()
        return module, found or {"": (None, None, False)}


def _run_pass(model: nn.Module, inputs: tuple[Any, ...], mode: str, seed: int, recorder: _Recorder) -> dict:
    """One seeded forward pass of a deep copy in ``mode``: ``{key: (module, {leaf path: leaf result})}``."""
    replica = copy.deepcopy(model).train(mode == "train")
    args = tuple(a.clone() if isinstance(a, Tensor) else a for a in inputs)  # in case a layer works in place
    grad = torch.set_grad_enabled(mode == "train")  # as training runs (and as trainfer.guard expects)
    with torch.random.fork_rng(devices=_cuda_devices(args)), grad, capture(replica, recorder) as found:
        torch.manual_seed(seed)
        try:
            replica(*args)
        except Exception as error:
            error.add_note(f"(raised during the {mode}-mode pass of trainfer.inspect)")
            raise
    return found


def _merge(modes: tuple[str, ...], results: dict[str, dict]) -> list[LayerRecord]:
    """One record per output leaf, in the first mode's finishing order (others' extras where they ran)."""
    flat = {
        mode: {key + path: (module, leaf) for key, (module, leaves) in found.items() for path, leaf in leaves.items()}
        for mode, found in results.items()
    }
    order: list[str] = []
    for mode in modes:
        order = _ordered_union(order, list(flat[mode]))
    records = []
    for key in order:
        present = {mode: flat[mode][key] for mode in modes if key in flat[mode]}
        module = next(iter(present.values()))[0]
        compared = [leaf for mode, (_, leaf) in present.items() if mode != REFERENCE_MODE and leaf[1] is not None]
        divergence, diverged = compared[0][1:] if compared and len(modes) == 2 else (None, False)
        stats = {mode: leaf[0] for mode, (_, leaf) in present.items()}
        records.append(LayerRecord(key, type(module).__name__, _count(module), stats, divergence, diverged))
    return records


def _ordered_union(first: list[str], second: list[str]) -> list[str]:
    """``first`` with ``second``'s missing keys inserted after the key that precedes them in ``second``."""
    merged, known = list(first), set(first)
    anchor = -1
    for key in second:
        if key in known:
            anchor = merged.index(key)
        else:
            anchor += 1
            merged.insert(anchor, key)
            known.add(key)
    return merged


def _divergence(value: Tensor, reference: Tensor | None) -> tuple[float | None, bool]:
    """``(relative error, beyond the dtype's tolerance)``; ``(None, False)`` without a reference."""
    if reference is None:
        return None, False
    if value.shape != reference.shape:
        return math.inf, True
    if not (reference.is_floating_point() or reference.is_complex()):
        value, reference = value.double(), reference.double()
        tolerance = 0.0
    else:
        tolerance = tolerance_for(reference.dtype)
    error = relative_error(value, reference)
    return error, not error <= tolerance


def _tensor_leaves(output: Any, path: str = "") -> list[tuple[str, Tensor]]:
    """The tensors inside an output, with paths ``[i]`` / ``[key]`` into tuples, lists and dicts."""
    if isinstance(output, Tensor):
        return [(path, output)]
    items: Iterable[tuple[Any, Any]]
    if isinstance(output, dict):
        items = output.items()
    elif isinstance(output, list | tuple):
        items = enumerate(output)
    else:
        return []
    return [leaf for key, item in items for leaf in _tensor_leaves(item, f"{path}[{key}]")]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_modes(modes: str | Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in modes.split(",")) if isinstance(modes, str) else tuple(modes)
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(MODES):
        raise InputError(f"modes must be distinct names from {MODES}; got {modes!r}")
    return chosen


def as_forward_args(example_inputs: Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """A tensor as the one positional argument, a tuple or list as the positional arguments.

    Raises ``TypeError`` naming what was given for anything else (a dict, a number, ...).
    """
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise InputTypeError(
        f"example_inputs must be a tensor or a tuple of forward arguments; got {type(example_inputs).__name__}"
    )


def _check_train_batch(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Refuse a train-mode pass that :func:`train_batch_problem` finds would fail (an :class:`InputError`)."""
    problem = train_batch_problem(model, inputs)
    if problem is not None:
        raise InputError(f"{problem}; pass a larger batch or modes=('eval',)")


def train_batch_problem(model: nn.Module, inputs: tuple[Any, ...]) -> str | None:
    """Why a train-mode pass of ``model`` on ``inputs`` cannot run, or ``None``.

    Train-mode BatchNorm normalises with batch statistics: a batch of one is not a batch. The text
    names the layer and the shape, not the remedy (the caller's: an argument here, an option on the CLI).
    """
    first = next((a for a in inputs if isinstance(a, Tensor)), None)
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or first is None or first.dim() == 0 or first.shape[0] != 1:
        return None
    return (
        f"the train-mode pass needs a batch of at least 2 examples: BatchNorm layer {norms[0] or 'model'!r} "
        f"normalises with batch statistics, and the input has shape {tuple(first.shape)} (batch size 1)"
    )


def _cuda_devices(args: tuple[Any, ...]) -> list[int]:
    return sorted({a.device.index or 0 for a in args if isinstance(a, Tensor) and a.device.type == "cuda"})
