"""The static cost check of a bundle's int8 form: what ``quantized.onnx`` would hold and compute, bounded
before any runtime sees the file (:func:`check_int8_cost`).

The operator allow-list (:mod:`trainfer.serve.int8_ops`) bounds what kind of thing the file computes, not
how much: allow-listed operators alone make a memory or CPU bomb of any size from a small file (a
``Conv`` whose ``pads`` are 3000 asks for a 37 GB tensor, 500 chained 1024x1024 ``MatMul``s cost 10 s a
forward, a ``Concat`` listing one tensor N times holds N copies, a ``sparse_initializer`` of a few bytes
is densified to 2 GiB when the session is created). So the graph's shapes are inferred
(``onnx.shape_inference``, strict) on the bundle's recorded input shape, and its memory and work are
bounded by the bounds the recorded fx architecture is held to at load
(:func:`trainfer.serve.computation_check.computation_limits`, for the float model's weights and that input)
and by the float model's own cost: the int8 form of a model computes what its float form does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from trainfer.errors import BundleError
from trainfer.serve.computation_check import MAX_TOTAL_FACTOR, computation_limits

__all__ = ["INT8_FLOPS_FACTOR", "check_int8_cost", "float_flops"]

#: An int8 form computes at most this many times its float model's floating-point operations.
INT8_FLOPS_FACTOR = 2


def float_flops(model: nn.Module, input_shape: list[int]) -> int | None:
    """The floating-point operations (``torch.utils.flop_counter``: convolutions, matmuls) of one forward of
    ``model`` on an input of ``input_shape``, counted on the meta device (no memory, no arithmetic); None
    when the model does not run there."""
    meta = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.float32)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, meta, (torch.empty(input_shape, device="meta", dtype=dtype),))
    except Exception:  # an op without a meta kernel: the shared bounds alone apply
        return None
    return int(counter.get_total_flops())


def check_int8_cost(model: Any, input_shape: list[int], weights: int, reference_flops: int | None, source: str) -> None:
    """Refuse (:class:`BundleError`) the int8 ONNX ``model`` (a checked ``ModelProto``: allow-listed
    operators, no nested graph) unless, on one input of ``input_shape`` (the bundle's recorded shape):

    - every tensor it stores (initializers; a sparse one counted dense, as the runtimes hold it) and every
      tensor a node computes (a ``Constant``'s value too) has a shape shape inference knows, of at most
      ``L`` elements, and all of them together at most ``MAX_TOTAL_FACTOR * L``;
    - its floating-point operations (2 per multiply-add of ``Conv``, ``Gemm`` and ``MatMul``; one per
      window element of a pooling) stay within the flop bound, and within :data:`INT8_FLOPS_FACTOR`
      times ``reference_flops`` (the float model's, when known);
    - every tensor's elements, and the flops, grow at most linearly with the batch, checked on twice and
      four times that batch (:func:`_linear`), so these bounds bound them per sample.

    ``L`` and the flop bound are :func:`~trainfer.serve.computation_check.computation_limits` for the
    float model's ``weights`` and the input's elements.
    """
    limit, flops_limit = computation_limits(weights, math.prod(input_shape))
    if reference_flops is not None:
        flops_limit = min(flops_limit, INT8_FLOPS_FACTOR * reference_flops)
    stored = dict(_stored_shapes(model))
    _check_sizes(stored, limit, input_shape, source)  # before inference, which reads them
    shapes = _inferred_shapes(model, stored, input_shape, source, input_shape)
    _check_sizes(shapes, limit, input_shape, source)
    flops = _flops(model, shapes)
    if flops > flops_limit:
        known = "" if reference_flops is None else f"; the float model computes {reference_flops:.3g}"
        raise BundleError(
            f"{source}: computes {flops:.3g} floating-point operations on the recorded input {input_shape}, over "
            f"the limit of {flops_limit:.3g}{known}: not an int8 form of this bundle's model"
        )
    _check_linear_in_batch(model, stored, shapes, flops, input_shape, source)


def _check_linear_in_batch(
    model: Any,
    stored: dict[str, list[int]],
    shapes: dict[str, list[int]],
    flops: int,
    input_shape: list[int],
    source: str,
) -> None:
    """Refuse a cost that grows faster than the batch: infer the shapes again on twice and four times the
    recorded batch ``b`` and refuse any tensor whose elements ``f``, or the flops, break
    :func:`_linear` on ``f(b), f(2b), f(4b)`` (a side branch of batch**5 elements is one element at
    batch 1). So every cost is at most linear in the batch, and the bounds checked on the recorded input
    bound it per sample."""
    batches = [input_shape[0] * times for times in (1, 2, 4)]
    inferred = [
        shapes,
        *(_inferred_shapes(model, stored, [n, *input_shape[1:]], source, input_shape) for n in batches[1:]),
    ]
    for name in shapes:
        grown = [each[name] for each in inferred]
        if not _linear(*(math.prod(shape) for shape in grown)):
            raise _superlinear(source, f"tensor {name!r} of shape", grown, batches, input_shape)
    grown_flops = [flops, *(_flops(model, each) for each in inferred[1:])]
    if not _linear(*grown_flops):
        raise _superlinear(
            source, "its floating-point operations,", [f"{f:.3g}" for f in grown_flops], batches, input_shape
        )


def _superlinear(source: str, what: str, values: list[Any], batches: list[int], input_shape: list[int]) -> BundleError:
    """The refusal of a cost (``what``) that takes ``values`` at ``batches``, not linear in the batch."""
    at = ", ".join(f"{value} at batch {n}" for value, n in zip(values, batches, strict=True))
    return BundleError(
        f"{source}: {what} {at} (the recorded input is {input_shape}), grows faster than the batch: "
        "not an int8 form of this bundle's model"
    )


def _linear(at_b: int, at_2b: int, at_4b: int) -> bool:
    """Whether a cost ``f`` of the batch, known at ``b``, ``2b`` and ``4b``, fits ``c + a N`` with ``c >= 0``:
    ``f(2b) <= 2 f(b)`` (a constant part that is not negative, so ``f(N) / N <= f(b) / b`` for ``N >= b``)
    and ``f(4b) - f(2b) <= 2 (f(2b) - f(b))`` (increments no larger than linear ones).

    Shape inference makes a size from the input's dimensions by sums and products, so a size is a
    polynomial in the batch; with coefficients that are not negative, a term ``N**k`` adds
    ``(2**k - 1)(2**k - 2) b**k`` to the second rule's left side over its right, zero exactly for
    ``k <= 1``: every superlinear term is caught, however small beside a constant (``c + N**2`` with
    ``c >= 2`` passes the first rule alone) or a linear term. The rules are exact, with no tolerance:
    sizes and flops are integers, and a form whose tensors are the batch times fixed dimensions meets
    both with equality; any slack would let a quadratic term hide behind a large linear one. (A graph
    that subtracts sizes can place a polynomial's roots at the three batches probed; the operator
    allow-list and the bounds at the recorded batch remain its limits.)"""
    return at_2b <= 2 * at_b and at_4b - at_2b <= 2 * (at_2b - at_b)


def _check_sizes(shapes: dict[str, list[int]], limit: int, input_shape: list[int], source: str) -> None:
    """Refuse a tensor of ``shapes`` over ``limit`` elements (or with a negative dimension), and all of
    them together over ``MAX_TOTAL_FACTOR * limit``."""
    total = 0
    for name, shape in shapes.items():
        elements = math.prod(shape)
        if elements > limit or min(shape, default=0) < 0:
            raise BundleError(
                f"{source}: tensor {name!r} of shape {shape} holds {elements} elements on the recorded input "
                f"{input_shape}, over the limit of {limit}: not an int8 form of this bundle's model"
            )
        total += elements
    if total > MAX_TOTAL_FACTOR * limit:
        raise BundleError(
            f"{source}: its tensors hold {total} elements in all on the recorded input {input_shape}, over "
            f"{MAX_TOTAL_FACTOR} x {limit}: not an int8 form of this bundle's model"
        )


def _inferred_shapes(
    model: Any, stored: dict[str, list[int]], input_shape: list[int], source: str, recorded: list[int]
) -> dict[str, list[int]]:
    """Every tensor's shape in ``model`` run on ``input_shape`` (the ``recorded`` input's, or that at another
    batch): the ``stored`` ones', and those its nodes compute by strict shape inference; a node output
    whose shape is not fully known is refused."""
    import onnx

    inputs = [value for value in model.graph.input if value.name not in stored]
    if len(inputs) != 1:
        raise BundleError(f"{source}: an int8 form takes one input, found {len(inputs)}")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    given = probe.graph.input[[value.name for value in probe.graph.input].index(inputs[0].name)]
    given.type.tensor_type.shape.Clear()
    given.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d) for d in input_shape)
    for output in probe.graph.output:  # the file's own declarations are not trusted: inferred afresh
        output.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except Exception as error:  # onnx's InferenceError, ValidationError: shapes that do not agree
        problem = f"its shapes do not agree on {_the_input(input_shape, recorded)}: {error}"
        raise BundleError(f"{source}: {problem}"[:600]) from None
    known = {**stored, inputs[0].name: list(input_shape)}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        shape = value.type.tensor_type.shape
        if value.type.HasField("tensor_type") and shape.dim and all(d.HasField("dim_value") for d in shape.dim):
            known[value.name] = [d.dim_value for d in shape.dim]
        elif value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape") and not shape.dim:
            known[value.name] = []  # a scalar
    for node in model.graph.node:
        unknown = next((name for name in node.output if name and name not in known), None)
        if unknown is not None:
            raise BundleError(
                f"{source}: the shape of {unknown!r}, output of node {node.name or node.op_type!r} ({node.op_type}), "
                f"cannot be inferred on {_the_input(input_shape, recorded)}: refusing a graph whose cost is unknown"
            )
    return known


def _the_input(input_shape: list[int], recorded: list[int]) -> str:
    """``input_shape`` in words: the recorded input, or that input at another batch (and why)."""
    if input_shape == recorded:
        return f"the recorded input {recorded}"
    return (
        f"the input {input_shape}, the recorded input {recorded} at batch {input_shape[0]} (inferred to check "
        "that its costs grow at most linearly with the batch)"
    )


def _stored_shapes(model: Any) -> Iterator[tuple[str, list[int]]]:
    """The name and dense shape of every initializer of ``model``, sparse ones too (the runtimes densify
    them); a ``Constant``'s value is its output, whose shape inference gives."""
    for tensor in model.graph.initializer:
        yield tensor.name, list(tensor.dims)
    for sparse in model.graph.sparse_initializer:
        yield sparse.values.name, list(sparse.dims)


def _flops(model: Any, shapes: dict[str, list[int]]) -> int:
    """The floating-point operations of ``model``'s nodes on known ``shapes`` (:func:`_node_flops`)."""
    return sum(_node_flops(node, shapes) for node in model.graph.node)


def _node_flops(node: Any, shapes: dict[str, list[int]]) -> int:
    """Floating-point operations of one node on known ``shapes``: 2 per multiply-add of a ``Conv``, ``Gemm``
    or ``MatMul``, one per window element of a pooling, none counted for the rest (elementwise, their
    work is their tensors, bounded as memory)."""
    output = math.prod(shapes[node.output[0]])
    if node.op_type == "Conv":
        return 2 * output * math.prod(shapes[node.input[1]][1:])
    if node.op_type == "MatMul":
        return 2 * output * shapes[node.input[0]][-1]
    if node.op_type == "Gemm":
        first = shapes[node.input[0]]
        transposed = any(a.name == "transA" and a.i for a in node.attribute)
        return 2 * output * first[0 if transposed else -1]
    if node.op_type in ("MaxPool", "AveragePool"):
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
        return output * math.prod(kernel)
    return 0
