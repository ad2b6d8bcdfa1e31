"""Attributions drawn as PNG files: a heat map over each image, a bar chart per table row.

An :class:`AttributionPlotter` draws a run's examples on one matplotlib figure, made for the first
example and redrawn for each next one (new data, colour limits, bars and title; the layout computed
again from the fresh figure's margins), so each PNG is the one a new figure would draw, without the
cost of building a figure, its axes, ticks and colour bar per example. It draws on matplotlib's Agg
canvas directly: no pyplot, and the process's matplotlib backend is left as it is. Files are written
atomically (:func:`trainfer.atomic.atomic_file`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from trainfer.analysis.attribution_methods import Attributions
from trainfer.atomic import Leftovers, atomic_file
from trainfer.errors import InputError

__all__ = ["DPI", "AttributionPlotter", "TargetKind", "plot_attribution"]

#: The resolution of the PNGs, in pixels per inch: a heat map is 770 x 374 pixels.
DPI = 110
#: What a title calls an explained target without a label: a classifier's class, another model's output.
TargetKind = Literal["class", "output"]
#: The margins and spacing of a figure's subplots, which the layout of each example starts from.
_MARGINS = ("left", "right", "bottom", "top", "wspace", "hspace")


def plot_attribution(
    result: Attributions,
    index: int,
    path: Path,
    labels: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    target_kind: TargetKind = "class",
) -> Path:
    """Draw example ``index`` of ``result`` to ``path`` (:meth:`AttributionPlotter.draw` of a new plotter)."""
    return AttributionPlotter(labels, columns, target_kind).draw(result, index, path)


class AttributionPlotter:
    """Draws examples of :class:`Attributions` to PNG files, reusing one figure while their shape stays.

    ``labels`` name the explained classes or outputs in the titles, ``columns`` the bars of table rows;
    ``target_kind`` is what an unlabelled target is called in the titles: ``"class"`` (a classifier's
    ``class 3``) or ``"output"`` (a regression model's ``output 0``).
    """

    def __init__(
        self,
        labels: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        target_kind: TargetKind = "class",
    ):
        self.labels, self.columns, self.target_kind = labels, columns, target_kind
        self._picture: _HeatMap | _Bars | None = None
        self._leftovers = Leftovers()  # a run's PNGs share a directory: it is listed once, not once a file

    def draw(self, result: Attributions, index: int, path: Path) -> Path:
        """Draw example ``index``: input and attribution overlay for ``(C, H, W)``/``(H, W)``, bars for
        ``(F,)``; write it to ``path`` (atomically) and return ``path``."""
        values, sample = result.values[index].cpu().double(), result.inputs[index].cpu().double()
        picture = self._picture_for(values, sample)
        picture.show(values, sample)
        picture.title.set_text(_title(result, index, self.labels, self.target_kind))
        picture.figure.subplots_adjust(**_fresh_margins())  # tight_layout starts from the margins it finds
        picture.figure.tight_layout()
        with atomic_file(path, self._leftovers) as tmp:
            picture.figure.canvas.print_png(tmp)
        return path

    def _picture_for(self, values: Tensor, sample: Tensor) -> _HeatMap | _Bars:
        """The figure drawn last if it fits this example's shapes, else a new one."""
        if self._picture is None or self._picture.shapes != (values.shape, sample.shape):
            if values.dim() == 1:
                self._picture = _Bars(values, sample, self.columns)
            elif values.dim() in (2, 3):
                self._picture = _HeatMap(values, sample)
            else:
                raise InputError(f"can draw attributions of shape (F,), (H, W) or (C, H, W); got {tuple(values.shape)}")
        return self._picture


def _fresh_margins() -> dict[str, float]:
    """The margins and spacing of subplots that a new figure starts with (matplotlib's settings)."""
    import matplotlib

    settings: Any = matplotlib.rcParams  # indexed by a computed name, which its type stubs do not allow
    return {name: settings[f"figure.subplot.{name}"] for name in _MARGINS}


def _new_figure(size: tuple[float, float]) -> Any:
    """A figure of ``size`` inches at :data:`DPI`, on its own Agg canvas (not registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


class _HeatMap:
    """Left: the input (rescaled to [0, 1]); right: attributions summed over channels, over it."""

    def __init__(self, values: Tensor, sample: Tensor):
        self.shapes = (values.shape, sample.shape)
        self.figure = _new_figure((7, 3.4))
        image, heat = self._image(sample).numpy(), self._heat(values).numpy()
        left, right = self.figure.subplots(1, 2)
        self.inputs = [axis.imshow(image, cmap="gray") for axis in (left, right)]
        for axis in (left, right):
            axis.axis("off")
        left.set_title("input")
        self.heat = right.imshow(heat, cmap="bwr", alpha=0.6)
        right.set_title("attribution")
        self.figure.colorbar(self.heat, ax=right, fraction=0.046)  # follows the heat map's colour limits
        self.title = self.figure.suptitle("")

    def show(self, values: Tensor, sample: Tensor) -> None:
        """Put this example's input and attributions on the figure, colour limits symmetric about 0."""
        for shown in self.inputs:
            shown.set_data(self._image(sample).numpy())
            shown.autoscale()  # the grey scale spans this input's values, as a new image's would
        heat = self._heat(values)
        limit = float(heat.abs().max()) or 1.0
        self.heat.set_data(heat.numpy())
        self.heat.set_clim(-limit, limit)

    @staticmethod
    def _image(sample: Tensor) -> Tensor:
        image = sample if sample.dim() == 2 else (sample.permute(1, 2, 0) if sample.shape[0] == 3 else sample.mean(0))
        return (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)

    @staticmethod
    def _heat(values: Tensor) -> Tensor:
        return values if values.dim() == 2 else values.sum(0)


class _Bars:
    """One horizontal bar per column, first column on top: red positive, blue negative."""

    def __init__(self, values: Tensor, sample: Tensor, columns: Sequence[str] | None):
        self.shapes = (values.shape, sample.shape)
        names = list(columns) if columns and len(columns) == len(values) else [f"x{i}" for i in range(len(values))]
        self.figure = _new_figure((7, max(2.5, 0.3 * len(names) + 1)))
        self.axis = self.figure.subplots()
        self.bars = self.axis.barh(names, values.numpy())
        self.axis.invert_yaxis()  # first column on top
        self.axis.axvline(0, color="black", linewidth=0.8)
        self.axis.set_xlabel("attribution")
        self.title = self.figure.suptitle("")

    def show(self, values: Tensor, sample: Tensor) -> None:
        """Set each bar's length and colour to this example's attributions; rescale the axis to them."""
        for bar, value in zip(self.bars, values.tolist(), strict=True):
            bar.set_width(value)
            bar.set_facecolor("tab:red" if value > 0 else "tab:blue")
        self.axis.relim()
        self.axis.autoscale_view()


def _title(result: Attributions, index: int, labels: Sequence[str] | None, target_kind: TargetKind) -> str:
    score = f"score {float(result.scores[index]):.4g}"
    if result.target is None:
        return f"{result.method}: {score}"
    klass = int(result.target[index])
    name = labels[klass] if labels is not None and klass < len(labels) else f"{target_kind} {klass}"
    return f"{result.method}: {name} ({score})"
