"""The bounded computation check of a rebuilt architecture: one run on the meta device that refuses a
graph computing more than an inference form (see :func:`check_computation`).
"""

from __future__ import annotations

import math
import operator
from typing import Any, cast

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional as F

from trainfer.errors import BundleError
from trainfer.serve.architecture_tables import FUNCTION_NAMES, FUNCTIONS, MAX_INT, OPERATORS
from trainfer.serve.flop_replay import FlopReplay

__all__ = ["MAX_TOTAL_FACTOR", "check_computation", "computation_limits"]

MAX_EXPONENT = 64  #: magnitude of a Python ``**`` exponent
MAX_GROWTH = 1024  #: a tensor the graph computes holds at most this many times the input's elements...
MIN_ELEMENTS_LIMIT = 2**24  #: ...or this many, whichever is larger,
MAX_ELEMENTS_LIMIT = 2**30  #: and never more than this (on the recorded example input);
MAX_TOTAL_FACTOR = 16  #: all the tensors it computes hold at most this many times that limit.
FLOPS_PER_WEIGHT = 8  #: floating-point operations per weight (and input element) per input element...
MIN_FLOPS = 2**30  #: ...or this many, whichever is larger,
MAX_FLOPS = 10**12  #: and never more than this (on the recorded example input).

_PYTHON_OPERATORS = frozenset(FUNCTIONS[f"operator.{name}"] for name in OPERATORS if name != "getitem")
_NUMBER = (bool, int, float)
_SOFTMAXES = frozenset(
    {("call_function", F.softmax), ("call_function", F.log_softmax), ("call_function", torch.softmax)}
    | {("call_method", "softmax"), ("call_method", "log_softmax")}
)


def check_computation(gm: fx.GraphModule, input_shape: list[int] | None, where: str) -> Any:
    """Run ``gm`` (its weights loaded) once on the meta device (no memory, no arithmetic) on an input of
    ``input_shape`` in its weights' dtype; return the output's meta tensors, or refuse
    (:class:`~trainfer.errors.BundleError`) a graph that computes more than an inference form:

    - Python operators (``operator.add``, ``mul``, ``pow``, ...) take tensors or numbers, never
      sequences or strings (``[0] * 3e8`` repeats a list); integers they compute stay within
      :data:`MAX_INT`, and a ``**`` between numbers has an exponent of at most :data:`MAX_EXPONENT`;
    - a method is called on a tensor; a softmax runs over a dimension its input has;
    - memory: no tensor the graph computes holds more than ``L = max(MAX_GROWTH * input elements,
      MIN_ELEMENTS_LIMIT)`` elements, capped at :data:`MAX_ELEMENTS_LIMIT` (a pad of 30000 per side,
      an ``interpolate`` by 1e5, an ``expand`` to 1e15 elements), and all of them together at most
      ``MAX_TOTAL_FACTOR * L`` (forty such tensors kept alive for one ``cat``);
    - time: its floating-point operations (``torch.utils.flop_counter``: matmuls, convolutions, ...)
      stay within ``max(FLOPS_PER_WEIGHT * (weights + input elements) * input elements, MIN_FLOPS)``,
      capped at :data:`MAX_FLOPS`: the work of a network of that many weights on that input (a chain of
      4096x4096 matmuls on an 8x8 image is not);
    - the graph runs, through the interpreter and through the code fx generated for it: shapes agree,
      no division by zero, no parameter shadows a name the code uses.

    Both runs count toward the flop limit. The second is answered from the first's record while its aten
    calls repeat the first's (:class:`~trainfer.serve.flop_replay.FlopReplay`), and a few elementwise ops
    skip PyTorch's Python meta kernels (:func:`~trainfer.serve.meta_shortcuts.shortcut`): the same
    results and counts as running them, at a fraction of the CPU (``benchmarks/bench_architecture_check.py``).
    """
    if input_shape is None:
        raise BundleError(f"{where}: a recorded architecture needs the example input shape (input.shape is null)")
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise BundleError(f"{where}: a recorded architecture takes one input, found {len(placeholders)} placeholders")
    elements = math.prod(input_shape)
    weights = sum(t.numel() for t in gm.state_dict().values())
    limit, flops = computation_limits(weights, elements)
    meta = {name: torch.empty_like(t, device="meta") for name, t in gm.state_dict(keep_vars=True).items()}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.float32)  # the weights' own
    example = torch.empty(input_shape, device="meta", dtype=dtype)
    try:
        with torch.no_grad(), FlopReplay() as counter:
            output = functional_call(_Checked(gm, limit), {f"gm.{k}": v for k, v in meta.items()}, (example,))
            counter.replay()  # the code fx generated, on the same input: its calls repeat the interpreter's
            functional_call(gm, meta, (example,))
    except BundleError as error:  # the interpreter appends where it was: the first line says what
        raise BundleError(f"{where}: {str(error.args[0]).splitlines()[0]}") from None
    except Exception as error:  # a graph that does not run on its own example input: the manifest's fault
        raise BundleError(
            f"{where}: does not run on the recorded input shape {list(input_shape)}: {type(error).__name__}: "
            f"{str(error)[:300]}"
        ) from None
    if counter.flops > flops:
        raise BundleError(
            f"{where}: computes {counter.flops:.3g} floating-point operations on its example input, over "
            f"the limit of {flops:.3g} for {weights} weights and {elements} input elements"
        )
    return output


def computation_limits(weights: int, elements: int) -> tuple[int, int]:
    """The bounds :func:`check_computation` applies to a network of ``weights`` weights on an input of
    ``elements`` elements: the elements one tensor may hold (``L``; all of them together:
    ``MAX_TOTAL_FACTOR * L``) and the floating-point operations of one forward (see its docstring).
    A bundle's int8 form is bounded by the same (:mod:`trainfer.serve.int8_cost`)."""
    limit = min(max(MAX_GROWTH * elements, MIN_ELEMENTS_LIMIT), MAX_ELEMENTS_LIMIT)
    flops = min(max(FLOPS_PER_WEIGHT * (weights + elements) * elements, MIN_FLOPS), MAX_FLOPS)
    return limit, flops


class _Checked(nn.Module):
    """``gm`` run by :class:`_BoundedRun` (a module, so that ``functional_call`` swaps in meta weights)."""

    def __init__(self, gm: fx.GraphModule, limit: int) -> None:
        super().__init__()
        self.gm, self.limit = gm, limit

    def forward(self, x: torch.Tensor) -> Any:
        return _BoundedRun(self.gm, self.limit).run(x)


class _BoundedRun(fx.Interpreter):
    """An interpreter that checks each node's operands before it runs and its result after."""

    def __init__(self, gm: fx.GraphModule, limit: int) -> None:
        super().__init__(gm)
        self.limit, self.total = limit, 0

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in _PYTHON_OPERATORS:
            _check_operands(n, [self.env[a] if isinstance(a, fx.Node) else a for a in n.args])
        if n.op == "call_method" and not isinstance(self.env[cast(fx.Node, n.args[0])], torch.Tensor):
            raise BundleError(f"node {n.name!r}: method {n.target!r} is called on a non-tensor")
        self._check_softmax_dim(n)
        result = super().run_node(n)
        self._check_result(n, result)
        return result

    def _check_softmax_dim(self, n: fx.Node) -> None:
        """PyTorch's meta kernels of softmax accept any ``dim``: refuse one outside the input's dimensions."""
        dim: Any
        if n.op == "call_module" and isinstance(self.module.get_submodule(cast(str, n.target)), nn.Softmax):
            dim = self.module.get_submodule(cast(str, n.target)).dim
        elif (n.op, n.target) in _SOFTMAXES:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        else:
            return
        given = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(given, torch.Tensor) and isinstance(dim, int) and not -given.dim() <= dim < max(given.dim(), 1):
            raise BundleError(f"node {n.name!r}: softmax over dim {dim} of a {given.dim()}-dimensional tensor")

    def _check_result(self, n: fx.Node, result: Any) -> None:
        for item in result if isinstance(result, tuple | list) else (result,):
            if isinstance(item, torch.Tensor) and item.numel() > self.limit:
                raise BundleError(
                    f"node {n.name!r} ({_shown(n)}) computes a tensor of {item.numel()} elements on the example "
                    f"input, over the limit of {self.limit}"
                )
            if isinstance(item, torch.Tensor):
                self.total += item.numel()
                if self.total > MAX_TOTAL_FACTOR * self.limit:
                    raise BundleError(
                        f"node {n.name!r} ({_shown(n)}): the graph's tensors hold more than {MAX_TOTAL_FACTOR} x "
                        f"{self.limit} elements in all on the example input"
                    )
            if isinstance(item, int) and abs(item) > MAX_INT:
                raise BundleError(f"node {n.name!r} ({_shown(n)}) computes an integer over 2**62 in magnitude")


def _shown(n: fx.Node) -> str:
    """What node ``n`` calls, as the description names it."""
    return FUNCTION_NAMES.get(id(n.target), str(n.target))


def _check_operands(n: fx.Node, operands: list[Any]) -> None:
    for operand in operands:
        if not isinstance(operand, (torch.Tensor, *_NUMBER)):
            raise BundleError(f"node {n.name!r}: {_shown(n)} takes tensors or numbers, found {type(operand).__name__}")
    if n.target is operator.pow and all(isinstance(o, _NUMBER) for o in operands):
        exponent = operands[1] if len(operands) > 1 else 0
        if abs(exponent) > MAX_EXPONENT:
            raise BundleError(
                f"node {n.name!r}: a power of numbers with the exponent {exponent!r:.40} (limit {MAX_EXPONENT})"
            )
