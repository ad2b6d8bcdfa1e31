"""The result of :func:`trainfer.analysis.inspection.inspect` and how it is shown: per-output
:class:`Stats`, one :class:`LayerRecord` per module output, the :class:`Inspection` holding them
(JSON, a fixed-width table, a plot).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainfer.atomic import atomic_file

__all__ = ["Inspection", "LayerRecord", "Stats", "format_table", "plot_inspection"]


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
        kept = _finite(values)
        kept = (kept.abs() if kept.is_complex() else kept).double()
        summary: tuple[float | None, float | None, float | None, float | None] = (None, None, None, None)
        if kept.numel():
            mean, std, low, high = torch.stack([kept.mean(), kept.std(correction=0), *torch.aminmax(kept)]).tolist()
            summary = (mean, std, low, high)
        zeros = (values.numel() - int(torch.count_nonzero(values))) / values.numel() if values.numel() else 0.0
        return cls(
            tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), *summary, zeros, len(values) - len(kept)
        )


def _finite(values: Tensor) -> Tensor:
    """The finite elements of the flat ``values``: ``values`` itself, not a copy, when all are (the usual case,
    found by one cheap pass: NaN and infinities show in the minimum or maximum)."""
    if not values.is_floating_point():
        return values[torch.isfinite(values)] if values.is_complex() else values
    if values.numel() and bool(torch.isfinite(torch.stack(torch.aminmax(values))).all()):
        return values
    return values[torch.isfinite(values)]


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
    """The result of :func:`~trainfer.analysis.inspection.inspect`: one :class:`LayerRecord` per module output,
    in finishing order."""

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
