"""The ONNX operators a bundle's int8 form (``quantized.onnx``) may use: what trainfer writes, nothing else.

:func:`trainfer.quantize` writes that file (ONNX Runtime's ``quantize_static``, QDQ format, of a
folded deploy form), so its operator set is known: for trainfer's models (``digits_net``,
``repvgg_*``, ``mobileone_*``) it is exactly ``QuantizeLinear``, ``DequantizeLinear``, ``Conv``,
``Gemm``, ``Relu``, ``GlobalAveragePool``, ``Flatten`` and ``Identity``; :data:`INT8_OPS` adds the
few plain tensor operators a deploy form of your own exports (residual ``Add``, ``MatMul``,
pooling, ``Reshape``, ``Concat``, squeeze-excitation's ``Sigmoid``/``Mul``/``ReduceMean``...).
Each one computes a bounded function of its inputs: no control flow (``Loop``, ``If``, ``Scan``),
no operator whose output size is read from data (``ConstantOfShape``, ``Expand``, ``Tile``,
``Range``, ``Resize``, ``Pad``), no random, string or sequence operators, no custom domains.

:func:`check_int8_ops` runs when a bundle's int8 form is loaded, before ONNX Runtime or
OpenVINO sees the file, on the main graph, every nested graph (node attributes, refused as
such: no allowed operator takes one) and every model-local function, at most
:data:`MAX_INT8_NODES` nodes in all, every tensor held inside the file (never ONNX's external data:
another file, which the sha256 does not cover and which a runtime reading the model from memory would
look for in the working directory); anything else is a :class:`BundleError`. How much the allowed
operators compute is bounded by :mod:`trainfer.serve.int8_cost`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trainfer.errors import BundleError

__all__ = ["INT8_OPS", "MAX_INT8_NODES", "check_int8_ops"]

INT8_OPS = frozenset(
    {
        # what quantize writes for trainfer's models
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Gemm",
        "Relu",
        "GlobalAveragePool",
        "Flatten",
        "Identity",
        # plain tensor operators of other deploy forms
        "Add",
        "Mul",
        "MatMul",
        "Sigmoid",
        "Clip",
        "MaxPool",
        "AveragePool",
        "ReduceMean",
        "Reshape",
        "Concat",
        "Transpose",
        "Softmax",
        "Constant",
    }
)
MAX_INT8_NODES = 100_000
_STANDARD_DOMAINS = ("", "ai.onnx")


def check_int8_ops(data: bytes, source: str) -> Any:
    """The ONNX model ``data`` parsed (a ``ModelProto``), once every node of every graph and function is
    a standard-domain operator of :data:`INT8_OPS`, at most :data:`MAX_INT8_NODES` in all, and every tensor
    holds its own data (none in an external file); refused (:class:`BundleError`) otherwise. What it
    computes is bounded next (:func:`trainfer.serve.int8_cost.check_int8_cost`)."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as error:  # protobuf's DecodeError, a recursion limit: not a model
        raise BundleError(f"{source} is not a valid ONNX model: {error}") from None
    count = 0
    for where, node in _nodes(model):
        count += 1
        if count > MAX_INT8_NODES:
            raise BundleError(f"{source} has more than {MAX_INT8_NODES} nodes: not an int8 form trainfer wrote")
        if node.domain not in _STANDARD_DOMAINS or node.op_type not in INT8_OPS:
            name = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
            raise BundleError(
                f"{source} uses the ONNX operator {name!r} ({where}), which trainfer's int8 forms never "
                f"contain: refusing to run it (allowed: {', '.join(sorted(INT8_OPS))})"
            )
        graphs = [a.name for a in node.attribute if a.HasField("g") or len(a.graphs)]
        if graphs:
            raise BundleError(
                f"{source}: node {node.name or node.op_type!r} ({where}) holds a graph (attribute {graphs[0]!r}), "
                "which no operator of trainfer's int8 forms takes: refusing to run it"
            )
    external = next((tensor.name for tensor in _tensors(model) if _is_external(tensor)), None)
    if external is not None:
        raise BundleError(
            f"{source}: tensor {external!r} keeps its data in another file, which trainfer's int8 forms never do "
            "(that file is not covered by the sha256): refusing to run it"
        )
    return model


def _nodes(model: Any) -> Iterator[tuple[str, Any]]:
    """Every node of ``model``: its graph, the graphs nested in node attributes, its local functions."""
    yield from _graph_nodes(model.graph, "the main graph")
    for function in model.functions:
        for node in function.node:
            yield f"function {function.domain}:{function.name}", node


def _tensors(model: Any) -> Iterator[Any]:
    """Every tensor stored in ``model``: its main graph's initializers (sparse ones too) and the tensors
    in node attributes (a ``Constant``'s value); nested graphs are refused before these are looked at."""
    attributes = [attribute for _, node in _nodes(model) for attribute in node.attribute]
    yield from model.graph.initializer
    yield from (attribute.t for attribute in attributes if attribute.HasField("t"))
    yield from (tensor for attribute in attributes for tensor in attribute.tensors)
    sparse = [*model.graph.sparse_initializer, *(a.sparse_tensor for a in attributes if a.HasField("sparse_tensor"))]
    for tensor in [*sparse, *(tensor for attribute in attributes for tensor in attribute.sparse_tensors)]:
        yield from (tensor.values, tensor.indices)


def _is_external(tensor: Any) -> bool:
    """Whether ``tensor`` names a file holding its data (ONNX's external data) instead of holding it."""
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _graph_nodes(graph: Any, where: str) -> Iterator[tuple[str, Any]]:
    for node in graph.node:
        yield where, node
        for attribute in node.attribute:
            for inner in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _graph_nodes(inner, f"a graph inside node {node.name or node.op_type!r}")
