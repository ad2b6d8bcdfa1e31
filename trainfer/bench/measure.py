"""Measure a model: latency, parameters, multiply-adds and peak memory of a forward pass.

The measurements other benchmarks build on:

* :func:`time_forward` - wall-clock latency of ``model(*inputs)`` under ``torch.inference_mode``;
* :func:`count_parameters` - parameter count;
* :func:`count_macs` - multiply-adds of the convolutions and matrix products a forward really
  executes, read from the dispatched aten calls (not from module types, so functional calls count);
* :func:`peak_memory` - the most tensor memory that was live at once while a function ran.
* :func:`time_forms` - several callables timed interleaved, so that ratios of medians hold on a
  busy machine (used by ``trainfer.compile`` to pick an engine and by :mod:`trainfer.bench.forms`).
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from trainfer.errors import InputError
from trainfer.opcount import AtenOpCounter

__all__ = [
    "Timing",
    "count_macs",
    "count_parameters",
    "MAX_THREADS",
    "check_threads",
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


#: The most intra-op threads a timing or a runtime takes: far more than any machine has cores (100000
#: crashed OpenBLAS's thread start-up). The CLI's ``--threads`` takes as many (a test keeps them equal).
MAX_THREADS = 1024


def _as_args(inputs: Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """A single tensor is one positional input; a tuple or list is the positional inputs."""
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def check_threads(count: int) -> int:
    """``count`` if it is a thread count from 1 to :data:`MAX_THREADS`, else :class:`InputError`."""
    if type(count) is not int or not 1 <= count <= MAX_THREADS:
        raise InputError(f"threads must be an int from 1 to {MAX_THREADS}; got {count!r}")
    return count


@contextmanager
def num_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (unchanged if None; else checked by
    :func:`check_threads`), restored afterwards."""
    saved = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(check_threads(count))
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
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``model(*inputs)``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Runs under ``torch.inference_mode()`` with ``torch.set_num_threads(threads)`` (restored
    afterwards). The model's train/eval mode is left as the caller set it: put it in ``eval()`` to
    time the inference behaviour. CUDA work is synchronised before each clock reading. ``clock``
    is wall time by default; ``time.thread_time`` measures the CPU time of the calling thread (at
    ``threads=1`` all of the work, and unaffected by other processes' load).
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
            start = clock()
            model(*args)
            _synchronize(args)
            samples.append(clock() - start)
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


def time_forms(
    forms: Mapping[str, Callable[..., Any]],
    inputs: Tensor | Sequence[Any],
    *,
    rounds: int = 5,
    repeats: int = 4,
    warmup: int = 3,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time several forms on the same inputs, interleaved: ``rounds`` x (``repeats`` calls of each form).

    Interleaving spreads background load evenly over the forms, so that the ratios of their
    medians are meaningful on a busy machine. ``progress()`` is called after each form's turn;
    ``clock`` is :func:`time_forward`'s. Raises :class:`~trainfer.errors.InputError` for ``rounds`` < 1.
    """
    if rounds < 1:
        raise InputError(f"need rounds >= 1; got rounds={rounds}")
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for model in forms.values():
        time_forward(model, inputs, warmup=warmup, repeats=1, threads=threads)
    for _ in range(rounds):
        for name, model in forms.items():
            timing = time_forward(model, inputs, warmup=0, repeats=repeats, threads=threads, clock=clock)
            samples[name] += timing.samples
            if progress is not None:
                progress()
    return {name: Timing.from_samples(values) for name, values in samples.items()}
