"""Compare the forms of a model: train, reparameterized, plain and deploy, on the same inputs.

:data:`FORMS` builds each form from a model without touching it; :func:`benchmark` measures every
form with :mod:`trainfer.bench.measure` (latency interleaved across forms, throughput, parameters,
multiply-adds, peak memory) into a :class:`BenchReport` that ``trainfer bench`` and ``benchmarks/``
print and plot.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainfer.bench.measure import Timing, count_macs, count_parameters, num_threads, peak_memory, time_forms
from trainfer.capture import capture
from trainfer.errors import InputError
from trainfer.models import reparameterize
from trainfer.recipe import model_form
from trainfer.reparam.blocks import ReparamBlock
from trainfer.reparam.verify import model_dtype

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.figure import Figure

__all__ = [
    "FORMS",
    "BenchReport",
    "FormResult",
    "benchmark",
    "deploy_form",
    "plain_form",
    "reparameterized_form",
    "same_form",
    "train_form",
]

FormBuilder = Callable[[nn.Module, tuple[Tensor, ...]], nn.Module]


def train_form(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> nn.Module:
    """The model as trained, in eval mode (a copy: the caller's model is untouched)."""
    return copy.deepcopy(model).eval()


def reparameterized_form(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> nn.Module:
    """A copy whose re-parameterizable blocks run their single conv (``trainfer.models.reparameterize``)."""
    return reparameterize(train_form(model, example_inputs))


def plain_form(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> nn.Module:
    """The speed limit: the reparameterized model's executed layers, in call order, as one ``nn.Sequential``.

    Each block becomes its fused ``Conv2d`` followed by its squeeze-excitation and activation
    (``Conv2d`` + ``ReLU`` for RepVGG); other leaf modules (pooling, flatten, linear) are kept.
    Defined for models whose forward is a chain of module calls; otherwise a ``ValueError`` says so
    (the check: the chain reproduces the model's output exactly).
    """
    reparameterized = reparameterized_form(model, example_inputs)
    blocks = [name for name, m in reparameterized.named_modules() if isinstance(m, ReparamBlock)]

    def is_layer(name: str, module: nn.Module) -> bool:
        inside_block = any(name.startswith(f"{block}.") for block in blocks)
        return not inside_block and (isinstance(module, ReparamBlock) or not any(module.children()))

    with torch.no_grad(), capture(reparameterized, lambda name, module, output: module, is_layer) as called:
        expected = reparameterized(*example_inputs)
    layers: list[nn.Module] = []
    for module in called.values():
        parts = [module.reparam, module.se, module.act] if isinstance(module, ReparamBlock) else [module]
        layers += [part for part in parts if part is not None and not isinstance(part, nn.Identity)]
    plain = nn.Sequential(*layers).eval()
    try:
        with torch.no_grad():
            same = len(example_inputs) == 1 and torch.equal(plain(*example_inputs), expected)
    except (RuntimeError, TypeError):  # a layer got an input it cannot take: not a chain
        same = False
    if not same:
        raise InputError(
            f"plain form: {type(model).__name__}'s forward is not a chain of its modules "
            "(replaying its layers in call order does not give its output)"
        )
    return plain


def deploy_form(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> nn.Module:
    """``trainfer.deploy``: the automatic folder's inference form, verified against the model."""
    from trainfer.reparam.deploy import deploy  # imported on use: it brings the folder and verification

    return deploy(model, example_inputs)


#: Form name -> builder ``(model, example_inputs) -> nn.Module``; every builder leaves ``model`` untouched.
FORMS: dict[str, FormBuilder] = {
    "train": train_form,
    "reparameterized": reparameterized_form,
    "plain": plain_form,
    "deploy": deploy_form,
}


@dataclass(frozen=True)
class FormResult:
    """One form's figures: latency at batch 1, throughput (items/s) at ``batch_size``, size and cost."""

    form: str
    latency: Timing
    batch_latency: Timing
    batch_size: int
    parameters: int
    macs: int
    peak_memory_bytes: int

    @property
    def throughput(self) -> float:
        return self.batch_size / self.batch_latency.median_s


@dataclass(frozen=True)
class BenchReport:
    """The forms measured in one run, the forms that could not be built (with why), the settings."""

    model: str
    input_shape: tuple[int, ...]
    threads: int
    results: list[FormResult]
    skipped: dict[str, str]
    #: Why the latencies cannot be trusted (:func:`trainfer.bench.conditions.untrusted`); empty: nothing seen.
    warnings: tuple[str, ...] = ()

    def ratio(self, numerator: str, denominator: str, batched: bool = False) -> float:
        """Median latency of form ``numerator`` over that of ``denominator`` (both from this run)."""
        timings = {r.form: (r.batch_latency if batched else r.latency) for r in self.results}
        return timings[numerator].median_s / timings[denominator].median_s

    def ratios(self) -> dict[str, tuple[float, float]]:
        """Latency ratios of the telling pairs measured, at batch 1 and at the batch size.

        ``train / reparameterized`` (what folding saves), ``reparameterized / plain`` and
        ``deploy / plain`` (how close a form comes to the plain chain of convs, the speed limit).
        """
        names = {r.form for r in self.results}
        pairs = [("train", "reparameterized"), ("reparameterized", "plain"), ("deploy", "plain")]
        return {
            f"{a} / {b}": (self.ratio(a, b), self.ratio(a, b, batched=True))
            for a, b in pairs
            if a in names and b in names
        }

    def table(self) -> str:
        """A plain-text table; the last column is each form's batch-1 latency over the baseline's
        (``plain`` when measured, else the last form)."""
        names = [r.form for r in self.results]
        base = "plain" if "plain" in names else names[-1]
        header = ["form", "params", "MMACs", "median ms", "p90 ms", f"items/s @{self.results[0].batch_size}"]
        rows = [header + ["peak MB", f"/ {base}"]]
        for r in self.results:
            rows.append(
                [
                    r.form,
                    f"{r.parameters:,}",
                    f"{r.macs / 1e6:,.1f}",
                    f"{r.latency.median_s * 1e3:.3f}",
                    f"{r.latency.p90_s * 1e3:.3f}",
                    f"{r.throughput:,.1f}",
                    f"{r.peak_memory_bytes / 2**20:,.2f}",
                    f"{self.ratio(r.form, base):.3f}",
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) + 2)]
        lines = [
            "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        batch = self.results[0].batch_size
        lines += [
            f"{pair}: {one:.3f} at batch 1, {many:.3f} at batch {batch}" for pair, (one, many) in self.ratios().items()
        ]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, and per form every figure including the raw timing samples."""
        forms = {}
        for r in self.results:
            forms[r.form] = {
                "latency_s": {"median": r.latency.median_s, "p90": r.latency.p90_s, "samples": list(r.latency.samples)},
                "batch_latency_s": {
                    "median": r.batch_latency.median_s,
                    "p90": r.batch_latency.p90_s,
                    "samples": list(r.batch_latency.samples),
                },
                "throughput_per_s": r.throughput,
                "parameters": r.parameters,
                "macs": r.macs,
                "peak_memory_bytes": r.peak_memory_bytes,
            }
        batch = self.results[0].batch_size if self.results else None
        settings = {"model": self.model, "input_shape": list(self.input_shape), "batch_size": batch}
        ratios = {pair: {"batch_1": one, f"batch_{batch}": many} for pair, (one, many) in self.ratios().items()}
        figures = {"forms": forms, "ratios": ratios, "skipped": self.skipped, "warnings": list(self.warnings)}
        return {**settings, "threads": self.threads, **figures}

    def plot(self) -> Figure:
        """Bars per form: batch-1 latency (median, whisker to p90) and throughput at the batch size."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 4), layout="constrained")
        left, right = figure.subplots(1, 2)
        names = [r.form for r in self.results]
        medians = [r.latency.median_s * 1e3 for r in self.results]
        spread = [[0] * len(names), [(r.latency.p90_s - r.latency.median_s) * 1e3 for r in self.results]]
        left.bar(names, medians, yerr=spread, capsize=4, color="tab:blue")
        left.set(title="latency at batch 1 (median, p90)", ylabel="ms")
        right.bar(names, [r.throughput for r in self.results], color="tab:green")
        right.set(title=f"throughput at batch {self.results[0].batch_size}", ylabel="items / s")
        figure.suptitle(f"{self.model}  input {tuple(self.input_shape)}  {self.threads} threads")
        return figure


def benchmark(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    forms: Sequence[str] = ("train", "reparameterized", "plain"),
    batch_size: int = 8,
    rounds: int = 5,
    repeats: int = 4,
    warmup: int = 3,
    threads: int | None = None,
    name: str | None = None,
    show_progress: bool = True,
) -> BenchReport:
    """Build each form of ``model`` and measure it on random inputs of ``input_shape`` (batch 1).

    Latency is timed at batch 1 and throughput at ``batch_size``, the forms interleaved
    (:func:`time_forms`); MACs at batch 1; peak memory of one forward at ``batch_size`` under
    ``torch.inference_mode``. A form whose builder raises ``ValueError`` (e.g. ``plain`` for a model
    that is not a chain of modules), or that would be another form measured twice (:func:`same_form`), is
    reported as skipped. Timings taken on a starved or busy machine carry the one-line ``warnings``
    :func:`trainfer.bench.conditions.untrusted` gives. The caller's model is not modified.
    """
    from trainfer.bench.conditions import measured, untrusted

    unknown = [form for form in forms if form not in FORMS]
    if unknown:
        raise InputError(f"unknown forms {unknown}; expected some of {list(FORMS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive; got {batch_size}")
    one = _random_input(model, input_shape, 1)
    many = _random_input(model, input_shape, batch_size)
    _check_accepts(model, one)
    steps = len(forms) * (2 + 2 * rounds)  # per form: build, a turn per round at each batch, peak memory
    with tqdm(total=steps, desc="bench", unit="step", disable=None if show_progress else True) as bar:
        built, skipped = _build_forms(model, forms, (one,), bar)
        if not built:
            raise InputError(f"no form could be built: {skipped}")
        bar.total = len(built) * (2 + 2 * rounds)
        bar.set_postfix_str("timing")
        timing = {"threads": threads, "rounds": rounds, "repeats": repeats, "warmup": warmup, "progress": bar.update}
        with num_threads(threads):
            used_threads = torch.get_num_threads()
        latency, at_one = measured(functools.partial(time_forms, built, one, **timing), used_threads)
        batch_latency, at_many = measured(functools.partial(time_forms, built, many, **timing), used_threads)
        flagged = [("batch 1", untrusted(at_one, latency)), (f"batch {batch_size}", untrusted(at_many, batch_latency))]
        bar.set_postfix_str("peak memory")
        memory = {form_name: _peak_memory(form, many, bar) for form_name, form in built.items()}
    results = []
    for form_name, form in built.items():
        parameters, macs = count_parameters(form), count_macs(form, one)
        results.append(
            FormResult(
                form_name, latency[form_name], batch_latency[form_name], batch_size, parameters, macs, memory[form_name]
            )
        )
    label = name or type(model).__name__
    warnings = tuple(f"{batch}: {warning}" for batch, warning in flagged if warning)[:1]  # once, as compile says it
    return BenchReport(label, tuple(int(size) for size in input_shape), used_threads, results, skipped, warnings)


def _peak_memory(form: nn.Module, batch: Tensor, bar: tqdm) -> int:
    """The peak memory of one ``torch.inference_mode`` forward of ``batch`` (:func:`peak_memory`); a step of ``bar``."""
    with torch.inference_mode():
        memory = peak_memory(functools.partial(form, batch), batch.device)
    bar.update()
    return memory


def _build_forms(
    model: nn.Module, forms: Sequence[str], example_inputs: tuple[Tensor, ...], bar: tqdm
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    built, skipped = {}, {}
    for form in forms:
        bar.set_postfix_str(f"building {form}")
        why = same_form(model, form, forms)
        if why is None:
            try:
                built[form] = FORMS[form](model, example_inputs)
            except ValueError as error:
                why = str(error)
        if why is not None:
            skipped[form] = why
        bar.update()
    return built, skipped


def same_form(model: nn.Module, form: str, forms: Sequence[str]) -> str | None:
    """Why ``form`` of ``model`` would measure another of ``forms`` again, or ``None``.

    A deploy form (a deploy bundle, say) is its own ``train`` and ``reparameterized`` form, and its ``plain`` form
    calls its own layers in the order it calls them (:func:`plain_form` keeps nothing else): the same model as
    ``deploy`` (or, without it, ``train``). A model without a re-parameterizable block left to fold is its own
    ``reparameterized`` form.
    """
    is_deploy = model_form(model) == "deploy"
    if form in ("train", "reparameterized") and "deploy" in forms and is_deploy:
        return "same as deploy: the model is a deploy form (e.g. a deploy bundle)"
    timed = next((other for other in ("deploy", "train") if other in forms), None)
    if form == "plain" and timed is not None and is_deploy:
        return (
            f"same as {timed}: the model is a deploy form (e.g. a deploy bundle), whose plain chain is its own layers"
        )
    folds = any(isinstance(m, ReparamBlock) and not m.deploy for m in model.modules())
    if form == "reparameterized" and "train" in forms and not folds:
        return "same as train: no re-parameterizable block (trainfer.blocks) to fold"
    return None


def _check_accepts(model: nn.Module, example: Tensor) -> None:
    """One eval-mode forward on a copy, so that a wrong input shape fails here with a clear message."""
    try:
        with torch.no_grad():
            train_form(model, (example,))(example)
    except (RuntimeError, ValueError) as error:
        raise InputError(
            f"{type(model).__name__} does not accept an input of shape {tuple(example.shape)}: {error}"
        ) from error


def _random_input(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> Tensor:
    """Standard-normal input of ``(batch_size, *input_shape[1:])`` with the model's dtype and device."""
    if len(input_shape) < 2 or any(int(size) < 1 for size in input_shape):
        raise InputError(
            f"input shape must be positive sizes with a batch dimension, like 1,3,224,224; got {input_shape}"
        )
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    shape = [batch_size, *[int(size) for size in input_shape[1:]]]
    return torch.randn(shape, dtype=model_dtype(model), device=device)
