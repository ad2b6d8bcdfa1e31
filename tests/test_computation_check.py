"""The load-time computation check of a rebuilt architecture at its limits, and the flop counter with a
replayed second run (trainfer.serve.computation_check, trainfer.serve.flop_replay)."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

import trainfer
from trainfer.serve.computation_check import MAX_TOTAL_FACTOR, MIN_ELEMENTS_LIMIT, MIN_FLOPS, check_computation
from trainfer.serve.flop_replay import FlopReplay
from trainfer.serve.meta_shortcuts import ARITHMETIC, SAME_AS_INPUT, shortcut

INPUT = [1, 1, 1, 1]  # one element, no weights: the limits are MIN_FLOPS and MIN_ELEMENTS_LIMIT


def _graph(build) -> fx.GraphModule:
    """A graph on one input ``x`` whose output is ``build(graph, x)``."""
    graph = fx.Graph()
    graph.output(build(graph, graph.placeholder("x")))
    return fx.GraphModule(nn.Module(), graph)


def _matmuls(a: int, b: int, c: int, count: int = 1) -> fx.GraphModule:
    """``count`` products of an ``a x b`` and a ``b x c`` matrix expanded from the input: 2abc flops each."""

    def build(graph: fx.Graph, x: fx.Node) -> fx.Node:
        s = graph.call_method("sum", (x,))
        left, right = graph.call_method("expand", (s, a, b)), graph.call_method("expand", (s, b, c))
        products = [graph.call_function(torch.matmul, (left, right)) for _ in range(count)]
        return products[-1]

    return _graph(build)


def test_flops_at_the_limit_pass_and_just_over_it_are_refused():
    """Both load-time runs (interpreter, generated code) count: 2 x 2abc; 4 x 512 x 512 x 1024 is MIN_FLOPS."""
    assert 4 * 512 * 512 * 1024 == MIN_FLOPS
    assert check_computation(_matmuls(512, 512, 1024), INPUT, "t").shape == (512, 1024)
    check_computation(_matmuls(512, 512, 1023), INPUT, "t")
    with pytest.raises(trainfer.BundleError, match=r"t: computes 1.07e\+09 floating-point operations .* 1.07e\+09"):
        check_computation(_matmuls(512, 512, 1025), INPUT, "t")


def test_flops_of_runs_and_nodes_that_pass_alone_are_refused_together():
    """Just over a quarter of the limit per product and run: one product passes, two are over it."""
    check_computation(_matmuls(257, 512, 1024), INPUT, "t")
    with pytest.raises(trainfer.BundleError, match="floating-point operations on its example input, over the limit"):
        check_computation(_matmuls(257, 512, 1024, count=2), INPUT, "t")


def _expands(elements: int, count: int) -> fx.GraphModule:
    """``count`` tensors of ``elements`` elements each (``expand`` of the input's sum, times 2)."""

    def build(graph: fx.Graph, x: fx.Node) -> fx.Node:
        s = graph.call_method("sum", (x,))
        products = [graph.call_function(operator.mul, (graph.call_method("expand", (s, elements)), 2.0))
                    for _ in range(count)]  # fmt: skip
        return products[-1]

    return _graph(build)


def test_memory_per_tensor_and_in_all_at_the_limits():
    """The input and its sum hold one element each; each of ``count`` expands and products holds ``elements``,
    and the output (the last product) is counted again: 2 + (2 count + 1) elements in all."""
    check_computation(_expands(MIN_ELEMENTS_LIMIT, 1), INPUT, "t")
    with pytest.raises(
        trainfer.BundleError, match=rf"tensor of {MIN_ELEMENTS_LIMIT + 1} elements .* {MIN_ELEMENTS_LIMIT}"
    ):
        check_computation(_expands(MIN_ELEMENTS_LIMIT + 1, 1), INPUT, "t")
    most = (MAX_TOTAL_FACTOR * MIN_ELEMENTS_LIMIT - 2) // 17  # with count 8
    check_computation(_expands(most, 8), INPUT, "t")
    with pytest.raises(trainfer.BundleError, match=rf"hold more than {MAX_TOTAL_FACTOR} x {MIN_ELEMENTS_LIMIT}"):
        check_computation(_expands(most + 1, 8), INPUT, "t")


# --------------------------------------------------------------------------- the replayed run
OPS = {
    "mm": lambda x, w: x @ w,
    "relu": lambda x, w: torch.relu(x),
    "add": lambda x, w: x + 1.5,
    "mm_t": lambda x, w: x @ w.t(),
    "transpose in place": lambda x, w: w.t_(),  # changes w's metadata: later calls on w differ from the record
    "bmm": lambda x, w: torch.bmm(x.unsqueeze(0), w.unsqueeze(0)),
}


def _run(ops: list[str], x: torch.Tensor, w: torch.Tensor) -> list[tuple]:
    """Each op applied to (x, w), with the metadata of what it gave."""
    return [(out.shape, out.stride(), out.dtype) for out in (OPS[name](x, w) for name in ops)]


@settings(max_examples=25, deadline=None)
@given(
    first=st.lists(st.sampled_from(sorted(OPS)), max_size=6), second=st.lists(st.sampled_from(sorted(OPS)), max_size=6)
)
def test_a_replayed_run_counts_and_returns_what_running_it_would(first, second):
    """Two runs under FlopReplay, the second replayed: the same flops and results as FlopCounterMode on both."""
    shapes = [(8, 8), (8, 8)]
    counted = {}
    for name, mode in [("replay", FlopReplay), ("counter", lambda: FlopCounterMode(display=False))]:
        x, w = (torch.empty(shape, device="meta") for shape in shapes)
        with torch.no_grad(), mode() as counter:
            results = _run(first, x, w)
            if name == "replay":
                counter.replay()
            results += _run(second, x, w)
        counted[name] = (counter.flops if name == "replay" else counter.get_total_flops(), results)
    assert counted["replay"] == counted["counter"]
    assert counted["replay"][0] == sum(2 * 8**3 for op in first + second if op in {"mm", "mm_t", "bmm"})


def test_a_replayed_result_is_a_new_tensor_like_the_recorded_one():
    """An in-place change to a replayed result (``t_``) leaves the recorded run's result as it was."""
    x = torch.empty(4, 8, device="meta")
    with torch.no_grad(), FlopReplay() as counter:
        recorded = x @ x.t()
        counter.replay()
        replayed = x @ x.t()
        replayed.t_()
    assert replayed is not recorded and (recorded.shape, recorded.stride()) == ((4, 4), (4, 1))
    assert counter.flops == 2 * 2 * 4 * 8 * 4


# --------------------------------------------------------------------------- the meta shortcuts
def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    """Meta tensors: new contiguous ones (0-d, empty, size-1 dims), then channels-last, transposed, offset, expanded."""
    plain = [
        torch.empty(shape, dtype=dtype, device="meta") for shape in [(), (0,), (3,), (1, 4, 8, 8), (2, 1, 3), (5, 0, 2)]
    ]
    base = torch.empty(2, 3, 4, 5, dtype=dtype, device="meta")
    other = [base.to(memory_format=torch.channels_last), base.transpose(0, 1), base[1], base[:, :1].expand(2, 3, 4, 5)]
    return plain + other


@pytest.mark.parametrize("func", sorted(SAME_AS_INPUT, key=str))
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]
)
def test_a_shortcut_gives_what_the_meta_kernel_gives_or_nothing(func, dtype):
    """Where the shortcut answers, the kernel gives the same metadata (and counts no flops); it answers for
    every new contiguous floating-point tensor, and for nothing else."""
    for index, x in enumerate(_tensors(dtype)):
        quick = shortcut(func, (x,), {})
        assert (quick is not None) == (dtype.is_floating_point and index < 6), (func, x.shape, x.stride())
        if quick is not None:
            with FlopCounterMode(display=False) as counter:
                real = func(x)
            assert _same_metadata(quick, real)
            assert counter.get_total_flops() == 0
    x = torch.empty(3, device="meta")
    assert shortcut(func, (x, x), {}) is None and shortcut(func, (x,), {"approximate": "tanh"}) is None
    assert shortcut(torch.ops.aten.hardshrink.default, (x,), {}) is None


def _same_metadata(quick: torch.Tensor, real: torch.Tensor) -> bool:
    return _like(quick, real) and quick.storage_offset() == real.storage_offset()


def _like(y: torch.Tensor, x: torch.Tensor) -> bool:
    return (y.shape, y.stride(), y.dtype, y.device, y.storage_offset()) == (x.shape, x.stride(), x.dtype, x.device, 0)


def _scalar(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((), dtype=dtype, device="meta")


@pytest.mark.parametrize("func", sorted(ARITHMETIC, key=str))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int64])
def test_an_arithmetic_shortcut_gives_what_the_meta_kernel_gives_or_nothing(func, dtype):
    """x: every tensor of ``_tensors``; y: Python numbers, x itself, a tensor like x of another dtype, 0-d meta
    and CPU tensors of each kind (float64, int, bool, complex), a broadcast row. Both orders."""
    tame = [_scalar(torch.float64), _scalar(torch.int32), torch.tensor(2.5)]  # a CPU scalar
    numbers = [1.0, -2.5, 1e300, float("nan"), float("-inf"), 0, 3, 2**63 - 1, -(2**63)]
    for x in _tensors(dtype)[:6] if dtype.is_floating_point else []:
        for number in numbers:
            for pair in [(x, number), (number, x)]:
                assert _same_metadata(shortcut(func, pair, {}), func(*pair))
        assert all(shortcut(func, (x, wild), {}) is None for wild in [2**63, -(2**63) - 1, True, 1j])
    for index, x in enumerate(_tensors(dtype)):
        other_dtype = torch.float32 if dtype != torch.float32 else torch.float64
        others = [
            x,
            x.to(other_dtype),
            *tame,
            _scalar(torch.bool),
            _scalar(torch.complex64),
            x[..., :1] if x.dim() else x,
        ]
        for y in others:
            for pair in [(x, y), (y, x)]:
                quick = shortcut(func, pair, {})
                answers = _like(y, x) or (y.dim() == 0 < x.dim() and any(y is t for t in tame))
                expected = dtype.is_floating_point and index < 6 and answers
                assert (quick is not None) == expected, (func, x.shape, x.stride(), y.dtype, y.shape)
                if quick is not None:
                    assert _same_metadata(quick, func(*pair))
    x = torch.empty(3, device="meta")
    assert shortcut(func, (x, x), {"alpha": 2}) is None and shortcut(func, (x, x, x), {}) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_a_hardtanh_shortcut_gives_what_the_meta_kernel_gives_or_nothing(dtype):
    """Bounds from Python numbers (nan, infinities, int64 extremes), both orders; min > max is left to the kernel."""
    func = torch.ops.aten.hardtanh.default
    numbers = [-2.5, 1e300, float("nan"), float("-inf"), 0, 3, 2**63 - 1, -(2**63)]
    for index, x in enumerate(_tensors(dtype)):
        for bounds in [(), (-2.0,), (0.5,), *((low, high) for low in numbers for high in numbers)]:
            quick = shortcut(func, (x, *bounds), {})
            low, high = (*bounds, *(-1, 1)[len(bounds) :])
            expected = dtype.is_floating_point and index < 6 and not low > high
            assert (quick is not None) == expected, (x.shape, x.stride(), bounds)
            if quick is not None:
                assert _same_metadata(quick, func(x, *bounds))
        assert shortcut(func, (x, 2.0, 1.0), {}) is None and shortcut(func, (x, True, 2.0), {}) is None
