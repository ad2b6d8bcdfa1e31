"""Measure a model: latency, parameters, multiply-adds and peak memory of a forward pass.

The measurements other benchmarks build on:

* :func:`time_forward` - wall-clock latency of ``model(*inputs)`` under ``torch.inference_mode``;
* :func:`count_parameters` - parameter count;
* :func:`count_macs` - multiply-adds of the convolutions and matrix products a forward really
  executes, read from the dispatched aten calls (not from module types, so functional calls count);
* :func:`peak_memory` - the most tensor memory that was live at once while a function ran.

and on top of them the comparison of a model's forms (:data:`FORMS`: train, reparameterized,
plain, deploy) that ``trainfer bench`` and ``benchmarks/`` print: :func:`time_forms` interleaves
the forms so that ratios of medians hold on a busy machine, :func:`benchmark` gathers every figure.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from trainfer.blocks import ReparamBlock
from trainfer.capture import capture
from trainfer.errors import InputError
from trainfer.models import reparameterize
from trainfer.testing import AtenOpCounter
from trainfer.verify import model_dtype

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.figure import Figure

__all__ = [
    "FORMS",
    "BenchReport",
    "FormResult",
    "Timing",
    "benchmark",
    "count_macs",
    "count_parameters",
    "num_threads",
    "peak_memory",
    "time_forms",
    "time_forward",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per forward call: the median, the 90th percentile (nearest rank) and every sample."""

    median_s: float
    p90_s: float
    samples: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        ordered = sorted(samples)
        p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
        return cls(statistics.median(ordered), p90, tuple(samples))


def _as_args(inputs: Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """A single tensor is one positional input; a tuple or list is the positional inputs."""
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


@contextmanager
def num_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (unchanged if None), restored afterwards."""
    saved = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise InputError(f"threads must be a positive number; got {count}")
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _synchronize(args: tuple[Any, ...]) -> None:
    """Wait for queued CUDA kernels, so that the clock measures the work and not its launch."""
    for leaf in tree_leaves(args):
        if isinstance(leaf, Tensor) and leaf.is_cuda:
            torch.cuda.synchronize(leaf.device)
            return


def time_forward(
    model: Callable[..., Any],
    inputs: Tensor | Sequence[Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> Timing:
    """Time ``model(*inputs)``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Runs under ``torch.inference_mode()`` with ``torch.set_num_threads(threads)`` (restored
    afterwards). The model's train/eval mode is left as the caller set it: put it in ``eval()`` to
    time the inference behaviour. CUDA work is synchronised before each clock reading.
    """
    if repeats < 1 or warmup < 0:
        raise InputError(f"need repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    args = _as_args(inputs)
    samples = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(*args)
        _synchronize(args)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*args)
            _synchronize(args)
            samples.append(time.perf_counter() - start)
    return Timing.from_samples(samples)


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements (each shared parameter counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _mm_macs(args: tuple[Any, ...]) -> int:
    """``(.., n, k) @ (.., k, m)``: ``batch * n * k * m`` multiply-adds."""
    first, second = args
    return first.numel() * second.shape[-1]


def _conv_macs(args: tuple[Any, ...], out: Tensor) -> int:
    """Each output (or, transposed, each input) element takes ``C_in/groups * prod(kernel)`` MACs."""
    inputs, weight, transposed = args[0], args[1], args[6]
    per_element = math.prod(weight.shape[1:])
    return (inputs.numel() if transposed else out.numel()) * per_element


def _attention_macs(args: tuple[Any, ...]) -> int:
    """``softmax(q k^T) v``: ``L S E`` for the scores plus ``L S E_v`` for the weighted sum."""
    query, key, value = args[:3]
    return query.numel() * key.shape[-2] + query.numel() // query.shape[-1] * value.shape[-2] * value.shape[-1]


_MAC_RULES: dict[str, Callable[[tuple[Any, ...], Any], int]] = {
    "convolution": _conv_macs,
    "mm": lambda args, out: _mm_macs(args[:2]),
    "bmm": lambda args, out: _mm_macs(args[:2]),
    "mv": lambda args, out: args[0].numel(),
    "addmm": lambda args, out: _mm_macs(args[1:3]),
    "baddbmm": lambda args, out: _mm_macs(args[1:3]),
    "addmv": lambda args, out: args[1].numel(),
    "_scaled_dot_product_flash_attention_for_cpu": lambda args, out: _attention_macs(args),
    "_scaled_dot_product_flash_attention": lambda args, out: _attention_macs(args),
    "_scaled_dot_product_efficient_attention": lambda args, out: _attention_macs(args),
    "_scaled_dot_product_cudnn_attention": lambda args, out: _attention_macs(args),
}


def count_macs(model: Callable[..., Any], *inputs: Any) -> int:
    """Multiply-adds of one ``model(*inputs)`` call, summed over the aten ops it executes.

    Counted: convolutions (any groups, dilation, transposed), ``mm``/``bmm``/``addmm``/``baddbmm``/
    ``mv``/``addmv`` (what ``nn.Linear`` and ``matmul`` dispatch to) and fused attention kernels.
    Element-wise ops, pooling and normalisation are not multiply-adds of a weight and are not counted.
    """
    total = 0

    def observe(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        nonlocal total
        rule = _MAC_RULES.get(func.overloadpacket.__name__)
        if rule is not None:
            total += rule(tuple(args), out)

    with torch.no_grad(), AtenOpCounter(observe):  # not inference_mode: it skips the decomposition to aten
        model(*inputs)
    return total


class _LiveTensorMemory:
    """Bytes of tensor storage created by dispatched ops and still alive; and the peak of that.

    A storage is counted once, when an op first returns it, unless the op merely returned (a view
    of) one of its own arguments' storage (in-place ops, views of parameters or inputs). It stops
    counting when its last reference goes (a weakref finaliser on the storage).
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def observe(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        known = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)}
        for leaf in tree_leaves(out):
            if not isinstance(leaf, Tensor):
                continue
            storage = leaf.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in known or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes of tensor memory allocated while ``fn()`` ran, above what was allocated before.

    * CUDA ``device``: ``torch.cuda.max_memory_allocated`` after resetting the peak (the caching
      allocator's own accounting, workspaces included).
    * CPU (default): every tensor storage the dispatched aten ops create is tracked from creation
      until it is freed, so the figure is exact for tensors (activations, saved-for-backward
      tensors, outputs) and deterministic; scratch buffers internal to a kernel are not seen.
      (``tracemalloc`` does not see torch's allocator and peak RSS cannot be reset per call.)
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _LiveTensorMemory()
    with AtenOpCounter(tracker.observe):
        fn()
    return tracker.peak


# --- Comparing the forms of a model ---------------------------------------------------------------

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
        layers += [part for part in parts if not isinstance(part, nn.Identity)]
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
    from trainfer.deploy import deploy  # imported on use: it brings the folder and verification

    return deploy(model, example_inputs)


#: Form name -> builder ``(model, example_inputs) -> nn.Module``; every builder leaves ``model`` untouched.
FORMS: dict[str, FormBuilder] = {
    "train": train_form,
    "reparameterized": reparameterized_form,
    "plain": plain_form,
    "deploy": deploy_form,
}


def time_forms(
    forms: dict[str, Callable[..., Any]],
    inputs: Tensor | Sequence[Any],
    *,
    rounds: int = 5,
    repeats: int = 4,
    warmup: int = 3,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time several forms on the same inputs, interleaved: ``rounds`` x (``repeats`` calls of each form).

    Interleaving spreads background load evenly over the forms, so that the ratios of their
    medians are meaningful on a busy machine. ``progress()`` is called after each form's turn.
    """
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for model in forms.values():
        time_forward(model, inputs, warmup=warmup, repeats=1, threads=threads)
    for _ in range(rounds):
        for name, model in forms.items():
            samples[name] += time_forward(model, inputs, warmup=0, repeats=repeats, threads=threads).samples
            if progress is not None:
                progress()
    return {name: Timing.from_samples(values) for name, values in samples.items()}


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
        return {**settings, "threads": self.threads, "forms": forms, "ratios": ratios, "skipped": self.skipped}

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
    that is not a chain of modules) is reported as skipped. The caller's model is not modified.
    """
    unknown = [form for form in forms if form not in FORMS]
    if unknown:
        raise InputError(f"unknown forms {unknown}; expected some of {list(FORMS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive; got {batch_size}")
    one = _random_input(model, input_shape, 1)
    many = _random_input(model, input_shape, batch_size)
    _check_accepts(model, one)
    with tqdm(total=len(forms) * (1 + 2 * rounds), desc="bench", unit="step", disable=not show_progress) as bar:
        built, skipped = _build_forms(model, forms, (one,), bar)
        if not built:
            raise InputError(f"no form could be built: {skipped}")
        bar.total = len(built) * (1 + 2 * rounds)
        bar.set_postfix_str("timing")
        timing = {"threads": threads, "rounds": rounds, "repeats": repeats, "warmup": warmup, "progress": bar.update}
        latency = time_forms(built, one, **timing)
        batch_latency = time_forms(built, many, **timing)
    results = []
    for form_name, form in built.items():
        with torch.inference_mode():
            memory = peak_memory(lambda form=form: form(many), many.device)
        parameters, macs = count_parameters(form), count_macs(form, one)
        results.append(
            FormResult(form_name, latency[form_name], batch_latency[form_name], batch_size, parameters, macs, memory)
        )
    with num_threads(threads):
        used_threads = torch.get_num_threads()
    label = name or type(model).__name__
    return BenchReport(label, tuple(int(size) for size in input_shape), used_threads, results, skipped)


def _build_forms(
    model: nn.Module, forms: Sequence[str], example_inputs: tuple[Tensor, ...], bar: tqdm
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    built, skipped = {}, {}
    for form in forms:
        bar.set_postfix_str(f"building {form}")
        try:
            built[form] = FORMS[form](model, example_inputs)
        except ValueError as error:
            skipped[form] = str(error)
        bar.update()
    return built, skipped


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
