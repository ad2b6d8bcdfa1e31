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
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.atomic import atomic_file
from trainfer.capture import capture
from trainfer.errors import InputError, InputTypeError
from trainfer.numerics import relative_error, tolerance_for

MODES = ("train", "eval")
#: The mode whose outputs are the divergence's reference: the one a deployed model runs in.
REFERENCE_MODE = "eval"


@dataclass(frozen=True)
class Stats:
    """Summary of one output tensor. ``mean/std/min/max`` cover its finite values (``None`` if none).

    ``std`` is the population standard deviation; ``zero_fraction`` is the fraction of exact zeros
    (dead ReLUs); ``nonfinite`` counts NaN and +-inf elements. Complex values are summarised by modulus.
    """

    shape: tuple[int, ...]
    dtype: str
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    zero_fraction: float
    nonfinite: int

    @classmethod
    def of(cls, tensor: Tensor) -> Stats:
        values = tensor.detach().reshape(-1)
        finite = torch.isfinite(values)
        kept = values[finite]
        kept = (kept.abs() if kept.is_complex() else kept).double()
        summary: tuple[float | None, float | None, float | None, float | None] = (None, None, None, None)
        if kept.numel():
            mean, std, low, high = torch.stack([kept.mean(), kept.std(correction=0), kept.min(), kept.max()]).tolist()
            summary = (mean, std, low, high)
        zeros = float((values == 0).sum()) / values.numel() if values.numel() else 0.0
        nonfinite = values.numel() - int(finite.sum())
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), *summary, zeros, nonfinite)


@dataclass(frozen=True)
class LayerRecord:
    """One module output.

    ``name`` is the module's qualified name (``""`` for the whole model), with ``#k`` for its k-th call
    and ``[i]`` / ``[key]`` for an element of a tuple / dict output. ``stats[mode]`` is ``None`` when
    the module ran but returned no tensor; a mode is absent when the module did not run in it.
    ``parameters`` counts the module's parameters, its children's included. ``divergence`` is the
    train-vs-eval relative error (``inf`` if the shapes differ), ``None`` unless both modes produced a
    tensor here; ``diverged`` says it exceeds the tolerance of the output's dtype.
    """

    name: str
    type: str
    parameters: int
    stats: dict[str, Stats | None]
    divergence: float | None = None
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; NaN and infinities become ``None``."""
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class Inspection:
    """The result of :func:`inspect`: one :class:`LayerRecord` per module output, in finishing order."""

    modes: tuple[str, ...]
    records: list[LayerRecord]

    @property
    def first_divergence(self) -> LayerRecord | None:
        """The first module whose train- and eval-mode outputs differ beyond the dtype's tolerance."""
        return next((record for record in self.records if record.diverged), None)

    def __getitem__(self, name: str) -> LayerRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no record named {name!r}; recorded: {[r.name for r in self.records]}")

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def to_records(self) -> list[dict[str, Any]]:
        """The records as JSON-serialisable dicts."""
        return [record.to_dict() for record in self.records]

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """``{"modes", "first_divergence", "records"}`` as JSON text; written atomically to ``path`` if given."""
        first = self.first_divergence
        document = {"modes": list(self.modes), "first_divergence": first and first.name, "records": self.to_records()}
        text = json.dumps(document, indent=2, allow_nan=False)
        if path is not None:
            with atomic_file(path) as tmp:
                tmp.write_text(text + "\n")
        return text

    def __str__(self) -> str:
        return format_table(self)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw per-layer mean +- std per mode, and the train/eval divergence, to an image file."""
        return plot_inspection(self, Path(path))


def inspect(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Any],
    modes: str | Sequence[str] = ("eval",),
    seed: int = 0,
) -> Inspection:
    """Record every module's output statistics in each of ``modes`` (``"train"`` and/or ``"eval"``).

    ``example_inputs`` is a tensor or a tuple of positional forward arguments. Each pass runs on a
    deep copy, with the RNG seeded by ``seed`` inside a forked RNG state; the eval pass under
    ``torch.no_grad``, the train pass with gradients on, as training runs.
    """
    modes = _check_modes(modes)
    inputs = as_forward_args(example_inputs)
    if "train" in modes:
        _check_train_batch(model, inputs)
    compare = len(modes) == 2
    recorders = {mode: _Recorder(keep=compare and mode == REFERENCE_MODE) for mode in modes}
    if compare:
        recorders["train"].reference = recorders[REFERENCE_MODE].kept
    reference_first = sorted(modes, key=lambda mode: mode != REFERENCE_MODE)
    results = {mode: _run_pass(model, inputs, mode, seed, recorders[mode]) for mode in reference_first}
    return Inspection(modes, _merge(modes, results))


class _Recorder:
    """The capture callback of one pass: reduces each output to statistics, keeping or comparing it.

    ``kept[name][k]`` holds the k-th call's tensors by leaf path when ``keep``; with a ``reference``,
    each output is compared with the same call's reference tensors.
    """

    def __init__(self, keep: bool, reference: dict[str, list[dict[str, Tensor]]] | None = None):
        self.keep, self.reference = keep, reference
        self.kept: dict[str, list[dict[str, Tensor]]] = {}
        self.calls: Counter[str] = Counter()

    def __call__(self, name: str, module: nn.Module, output: Any) -> tuple[nn.Module, dict[str, tuple]]:
        call = self.calls[name]
        self.calls[name] += 1
        leaves = _tensor_leaves(output)
        if self.keep:
            self.kept.setdefault(name, []).append({path: value.detach().clone() for path, value in leaves})
        if not leaves:
            return module, {"": (None, None, False)}
        references = self.reference.get(name, []) if self.reference is not None else []
        peers = references[call] if call < len(references) else {}
        return module, {path: (Stats.of(value), *_divergence(value, peers.get(path))) for path, value in leaves}


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
    """Train-mode BatchNorm normalises with batch statistics: a batch of one is not a batch."""
    first = next((a for a in inputs if isinstance(a, Tensor)), None)
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and first is not None and first.dim() > 0 and first.shape[0] == 1:
        raise InputError(
            f"the train-mode pass needs a batch of at least 2 examples: BatchNorm layer {norms[0] or 'model'!r} "
            f"normalises with batch statistics, and the input has shape {tuple(first.shape)} (batch size 1); "
            f"pass a larger batch or modes=('eval',)"
        )


def _cuda_devices(args: tuple[Any, ...]) -> list[int]:
    return sorted({a.device.index or 0 for a in args if isinstance(a, Tensor) and a.device.type == "cuda"})


def _json_safe(value: Any) -> Any:
    """Tuples to lists, non-finite floats to ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# ---- presentation: the table and the plot ---------------------------------------------------------------

_COLUMNS = ("mean", "std", "min", "max")
_LEFT_ALIGNED = {0, 1, 3, 5}  # name, type, mode, dtype


def format_table(inspection: Inspection) -> str:
    """A fixed-width table: a row per record and mode; ``<< first divergence`` marks where modes part."""
    header = ["name", "type", "params", "mode", "shape", "dtype", *_COLUMNS, "zeros", "nonfinite"]
    compare = len(inspection.modes) == 2
    header += ["rel.err"] if compare else []
    rows = [header]
    first = inspection.first_divergence
    for record in inspection.records:
        for i, (mode, stats) in enumerate(record.stats.items()):
            lead = [record.name or "(model)", record.type, f"{record.parameters:,}"] if i == 0 else ["", "", ""]
            rows.append(lead + [mode, *_stats_cells(stats)])
            if compare and i == len(record.stats) - 1:
                rows[-1].append(_number(record.divergence) + (" << first divergence" if record is first else ""))
    widths = [max(len(row[c]) for row in rows if c < len(row)) for c in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if c in _LEFT_ALIGNED else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    title = f"trainfer.inspect: {len(inspection)} outputs, modes {', '.join(inspection.modes)}"
    return "\n".join([title, *(line.rstrip() for line in lines)])


def _stats_cells(stats: Stats | None) -> list[str]:
    if stats is None:
        return ["(no tensor)", "", "", "", "", "", "", ""]
    shape = "x".join(map(str, stats.shape)) or "scalar"
    values = [_number(getattr(stats, column)) for column in _COLUMNS]
    return [shape, stats.dtype, *values, f"{stats.zero_fraction:.0%}", str(stats.nonfinite)]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value + 0.0:.3g}"  # + 0.0: no "-0"


def plot_inspection(inspection: Inspection, path: Path) -> Path:
    """Per-layer mean +- std for each mode (top) and, with two modes, the divergence on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    compare = len(inspection.modes) == 2
    names = [record.name or "(model)" for record in inspection.records]
    x = list(range(len(names)))
    width = min(max(8.0, 0.25 * len(names)), 40.0)
    figure, axes = plt.subplots(
        2 if compare else 1, 1, figsize=(width, 7 if compare else 4.5), sharex=True, squeeze=False
    )
    top = axes[0][0]
    for offset, mode in zip((-0.1, 0.1), inspection.modes):
        mean = [_stat(record, mode, "mean") for record in inspection.records]
        std = [_stat(record, mode, "std") for record in inspection.records]
        shifted = [i + offset for i in x]  # side by side, so neither mode's bars hide the other's
        top.errorbar(shifted, mean, yerr=std, fmt="o-", capsize=2, markersize=3, label=f"{mode} mode")
    top.set_ylabel("output mean +- std")
    top.legend()
    top.grid(alpha=0.3)
    if compare:
        _plot_divergence(axes[1][0], inspection, x)
    axes[-1][0].set_xticks(x, names, rotation=90, fontsize=7)
    top.set_title("per-layer outputs (in the order modules finish)")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(figure)
    return path


def _plot_divergence(axis: Any, inspection: Inspection, x: list[int]) -> None:
    floor = 1e-17  # identical outputs still show on a log scale
    errors = [math.nan if r.divergence is None else max(min(r.divergence, 1e300), floor) for r in inspection]
    axis.bar(x, errors, color=["tab:red" if r.diverged else "tab:gray" for r in inspection])
    axis.set_yscale("log")
    axis.set_ylabel(f"relative error train vs eval\n(0 drawn at {floor:g})")
    first = inspection.first_divergence
    if first is not None:
        index = inspection.records.index(first)
        axis.axvline(index, color="tab:red", linestyle="--", label=f"first divergence: {first.name or '(model)'}")
        axis.legend()
    axis.grid(alpha=0.3, axis="y")


def _stat(record: LayerRecord, mode: str, column: str) -> float:
    stats = record.stats.get(mode)
    value = None if stats is None else getattr(stats, column)
    return math.nan if value is None else value
