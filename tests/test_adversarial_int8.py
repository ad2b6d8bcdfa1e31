"""A bundle's int8 form (``quantized.onnx``), attacked by someone who read the docs and recomputes
its sha256 in ``quantization.json`` (integrity, not authenticity).

trainfer wrote that file, so it accepts only the operators it writes
(:data:`trainfer.serve.int8_ops.INT8_OPS`), on every graph, nested graph and function, before
ONNX Runtime or OpenVINO parses it: control flow (a ``Loop`` of 1e12 iterations hung predict),
size-from-data operators, custom domains and junk are a one-line :class:`trainfer.BundleError`.
Allowed operators are then costed on the bundle's recorded input shape
(:mod:`trainfer.serve.int8_cost`): a ``Conv`` whose ``pads`` are 400 (tensors grow as pads², the file
does not), a chain of 1024x1024 ``MatMul``s, one ``Concat`` listing a tensor 100 times, a sparse
initializer densified to 2 GiB, or a graph whose shapes cannot be inferred is refused too.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from serving_models import write_pngs
from time_limit import time_limit

import trainfer
from trainfer.cli import main
from trainfer.models import digits_net
from trainfer.serve.int8_cost import check_int8_cost, float_flops
from trainfer.serve.int8_ops import INT8_OPS, MAX_INT8_NODES, check_int8_ops


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    torch.manual_seed(0)
    samples = torch.rand(16, 1, 8, 8)
    gate = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)
    quantized = trainfer.quantize(digits_net().eval(), samples, gate=gate, equalize=False, sensitivity_samples=8)
    return quantized.save(tmp_path_factory.mktemp("int8") / "b")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_pngs(tmp_path_factory.mktemp("image"), 1)[0]


def tampered(bundle: Path, destination: Path, mutate) -> Path:
    """A copy of ``bundle`` whose quantized.onnx ``mutate(model)`` edited, its sha256 recomputed."""
    shutil.copytree(bundle, destination)
    model = onnx.load(str(destination / "quantized.onnx"))
    data = mutate(model) or model.SerializeToString()
    (destination / "quantized.onnx").write_bytes(data)
    entry = json.loads((destination / "quantization.json").read_text())
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (destination / "quantization.json").write_text(json.dumps(entry))
    return destination


def wrap_output(model, make_nodes) -> None:
    """Route the graph's output through the nodes ``make_nodes(inner, outer)`` builds."""
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_pre" if name == output else name for name in node.output]
    model.graph.node.extend(make_nodes(f"{output}_pre", output))


def identity_body(name: str):
    """A loop body carrying ``v`` through unchanged: (iteration, condition, v) -> (condition, v)."""
    return helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
        name,
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )


def loop(inner, outer):
    return [
        helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [10**12])),
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
        helper.make_node("Loop", ["trips", "go", inner], [outer], body=identity_body("body")),
    ]


def branch(inner, outer):
    then = helper.make_graph(
        [helper.make_node("Identity", [inner], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", [inner], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    return [
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["go"], [outer], then_branch=then, else_branch=other),
    ]


def scan(inner, outer):
    return [helper.make_node("Scan", [inner], [outer], body=identity_body("scan"), num_scan_inputs=1)]


def nested_in_an_allowed_op(inner, outer):
    return [helper.make_node("Identity", [inner], [outer], hidden=identity_body("hidden_with_loop"))]


def loop_in_a_nested_graph(inner, outer):
    body = identity_body("body")
    body.node.extend(loop("v", "unused"))
    return [helper.make_node("Identity", [inner], [outer], hidden=body)]


def custom_domain(inner, outer):
    return [helper.make_node("Conv", [inner], [outer], domain="evil.example")]


def microsoft_op(inner, outer):
    return [helper.make_node("Gelu", [inner], [outer], domain="com.microsoft")]


def constant_of_shape(inner, outer):
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [100_000, 100_000])
    return [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("ConstantOfShape", ["shape"], ["huge"]),
        helper.make_node("Add", [inner, "huge"], [outer]),
    ]


def external(tensor) -> None:
    """Keep ``tensor``'s data in the file ``weights.bin`` beside the model (ONNX external data), not in the model."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"


def external_constant(inner, outer):
    value = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    external(value)
    return [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", [inner, "c"], [outer])]


def with_function(called: bool):
    def mutate(model):
        function = helper.make_function(
            "evil.example", "Bomb", ["x"], ["y"], loop("x", "y"), [helper.make_opsetid("", 17)]
        )
        model.functions.append(function)
        model.opset_import.append(helper.make_opsetid("evil.example", 1))
        if called:
            wrap_output(model, lambda inner, outer: [helper.make_node("Bomb", [inner], [outer], domain="evil.example")])

    return mutate


def too_many_nodes(model):
    wrap_output(
        model,
        lambda inner, outer: [
            *(helper.make_node("Identity", [inner], [f"n{i}"]) for i in range(MAX_INT8_NODES)),
            helper.make_node("Identity", [inner], [outer]),
        ],
    )


ATTACKS = {
    "Loop of 1e12 iterations": (lambda model: wrap_output(model, loop), "'Loop'"),
    "If": (lambda model: wrap_output(model, branch), "'If'"),
    "Scan": (lambda model: wrap_output(model, scan), "'Scan'"),
    "graph hidden in an allowed op": (lambda model: wrap_output(model, nested_in_an_allowed_op), "holds a graph"),
    "Loop in a nested graph": (lambda model: wrap_output(model, loop_in_a_nested_graph), "holds a graph"),
    "custom domain": (lambda model: wrap_output(model, custom_domain), "'evil.example:Conv'"),
    "com.microsoft operator": (lambda model: wrap_output(model, microsoft_op), "'com.microsoft:Gelu'"),
    "ConstantOfShape bomb": (lambda model: wrap_output(model, constant_of_shape), "'ConstantOfShape'"),
    "function called": (with_function(True), "'evil.example:Bomb'"),
    "function defined, not called": (with_function(False), "function evil.example:Bomb"),
    "too many nodes": (too_many_nodes, f"more than {MAX_INT8_NODES} nodes"),
    # another file, not covered by the sha256 (a runtime reading the checked bytes looks in the working directory)
    "initializer in another file": (lambda model: external(model.graph.initializer[0]), "in another file"),
    "Constant in another file": (lambda model: wrap_output(model, external_constant), "tensor 'c' keeps its data in"),
    "not ONNX at all": (lambda model: b"\x0a\xff\xff\xff\xff\x0f junk", "not a valid ONNX model"),
}


def on_the_side(model, make_nodes) -> None:
    """Add the nodes ``make_nodes(input)`` builds (ending in ``side``) to the graph, their mean times 0
    added to its output: the answers are unchanged, the work is done."""
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    nodes = [
        *make_nodes(model.graph.input[0].name),
        helper.make_node("ReduceMean", ["side"], ["side_mean"], keepdims=0),
        helper.make_node("Mul", ["side_mean", "zero"], ["side_zero"]),
    ]
    wrap_output(model, lambda inner, outer: [*nodes, helper.make_node("Add", [inner, "side_zero"], [outer])])


def big_pads(model):
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [400] * 4


def matmul_chain(model):
    model.graph.initializer.append(numpy_helper.from_array(np.eye(512, dtype=np.float32), "w"))

    def chain(given):
        mean = helper.make_node("ReduceMean", [given], ["mean"], keepdims=0)
        return [mean, helper.make_node("Add", ["w", "mean"], ["m0"])] + [
            helper.make_node("MatMul", [f"m{i}", "w"], [f"m{i + 1}" if i < 1 else "side"]) for i in range(2)
        ]

    on_the_side(model, chain)


def concat_copies(model):
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 512, 512), np.float32), "c"))
    on_the_side(model, lambda given: [helper.make_node("Concat", ["c"] * 100, ["side"], axis=0)])


def sparse(dims, used: bool):
    def mutate(model):
        values = numpy_helper.from_array(np.ones(1, np.float32), "sp")
        indices = numpy_helper.from_array(np.zeros(1, np.int64), "sp_indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, dims))
        if used:
            on_the_side(model, lambda given: [helper.make_node("Identity", ["sp"], ["side"])])

    return mutate


def sparse_constant(model):
    values = numpy_helper.from_array(np.ones(1, np.float32), "v")
    value = helper.make_sparse_tensor(values, numpy_helper.from_array(np.zeros(1, np.int64), "i"), [23000, 23000])
    on_the_side(model, lambda given: [helper.make_node("Constant", [], ["side"], sparse_value=value)])


def wide_pooling(model):
    pool = helper.make_node("MaxPool", [], ["side"], kernel_shape=[4000, 4000], pads=[2000] * 4)
    on_the_side(model, lambda given: [pool] if pool.input.append(given) is None else [])


def shape_from_a_transpose(model):
    """A Reshape whose shape is computed (a Transpose data propagation does not follow): its output's shape
    is not known until it runs."""
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
    on_the_side(
        model,
        lambda given: [
            helper.make_node("Transpose", ["flat"], ["computed"]),
            helper.make_node("Reshape", [given, "computed"], ["side"]),
        ],
    )


def batch_power(model):
    """A side branch of batch**5 elements from Reshape and Mul alone (the attacker's ``mk_batchbomb.py``):
    one element at the recorded batch of 1, 32**5 at batch 32, 4.9 GB at batch 64."""
    model.graph.initializer.extend(
        numpy_helper.from_array(np.array([1] * k + [-1] + [1] * (4 - k), np.int64), f"axis{k}") for k in range(5)
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "rows"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((64, 1), np.float32), "ones"))

    def power(given):
        per_sample = [
            helper.make_node("Reshape", [given, "rows"], ["flat"]),
            helper.make_node("MatMul", ["flat", "ones"], ["mean"]),
        ]
        columns = [helper.make_node("Reshape", ["mean", f"axis{k}"], [f"r{k}"]) for k in range(5)]
        products = [helper.make_node("Mul", [f"p{k}" if k else "r0", f"r{k + 1}"], [f"p{k + 1}"]) for k in range(4)]
        return [*per_sample, *columns, *products, helper.make_node("Identity", ["p4"], ["side"])]

    on_the_side(model, power)


def batch_square_plus_constant(model):
    """A side branch of ``(N + 2)**2`` elements (``N**2 + 4 N + 4``): 9 at batch 1, 16 at 2, so every tensor
    at most doubles on twice the batch; 36 at 4, where the increments stop being linear."""
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "rows"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((64, 1), np.float32), "ones"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "two"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "column"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "row"))

    def square(given):
        return [
            helper.make_node("Reshape", [given, "rows"], ["flat"]),
            helper.make_node("MatMul", ["flat", "ones"], ["mean"]),
            helper.make_node("Reshape", ["mean", "flat_shape"], ["means"]),
            helper.make_node("Concat", ["means", "two"], ["longer"], axis=0),
            helper.make_node("Reshape", ["longer", "column"], ["u"]),
            helper.make_node("Reshape", ["longer", "row"], ["v"]),
            helper.make_node("Mul", ["u", "v"], ["side"]),
        ]

    on_the_side(model, square)


def batch_fixed_at_one(model):
    """A side branch that sets the input's 64 values a sample beside one sample's: only batch 1 fits."""
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 64], np.int64), "one_row"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "rows"))
    on_the_side(
        model,
        lambda given: [
            helper.make_node("Reshape", [given, "one_row"], ["first"]),
            helper.make_node("Reshape", [given, "rows"], ["each"]),
            helper.make_node("Concat", ["first", "each"], ["side"], axis=1),
        ],
    )


COST_ATTACKS = {
    "Conv pads 400": (big_pads, r"tensor '.*' of shape \[1, \d+, 806, 806\] holds \d+ elements .* over the limit"),
    "2 MatMuls of 512x512": (matmul_chain, r"computes 5.4e\+08 floating-point operations .* the float model computes"),
    "Concat of one tensor 100 times": (concat_copies, r"tensor 'side' of shape \[100, 512, 512\]"),
    "sparse initializer, unused": (sparse([23000, 23000], False), r"tensor 'sp' of shape \[23000, 23000\]"),
    "sparse initializer, used": (sparse([23000, 23000], True), r"tensor 'sp' of shape \[23000, 23000\]"),
    "sparse Constant": (sparse_constant, r"tensor 'side' of shape \[23000, 23000\]"),
    "MaxPool of a 4000x4000 window": (wide_pooling, r"floating-point operations on the recorded input \[1, 1, 8, 8\]"),
    "shape not inferable": (shape_from_a_transpose, r"the shape of 'side', output of node .* cannot be inferred"),
    "batch**5 side branch": (
        batch_power,
        r"tensor 'p1' of shape \[1, 1, 1, 1, 1\] at batch 1, \[2, 2, 1, 1, 1\] at batch 2, "
        r"\[4, 4, 1, 1, 1\] at batch 4 \(the recorded input is \[1, 1, 8, 8\]\), grows faster than the batch",
    ),
    "(batch + 2)**2 side branch": (
        batch_square_plus_constant,
        r"tensor 'side' of shape \[3, 3\] at batch 1, \[4, 4\] at batch 2, \[6, 6\] at batch 4 .* grows faster",
    ),
    "batch fixed at 1 by a Reshape": (
        batch_fixed_at_one,
        r"shapes do not agree on the input \[2, 1, 8, 8\], the recorded input \[1, 1, 8, 8\] at batch 2 \(inferred",
    ),
    "negative dims": (lambda model: model.graph.initializer[0].dims.insert(0, -1), "elements on the recorded input"),
}


@pytest.mark.parametrize("attack", list(COST_ATTACKS))
def test_what_allowed_operators_compute_is_bounded_before_any_runtime_sees_the_file(int8_bundle, tmp_path, attack):
    mutate, message = COST_ATTACKS[attack]
    bundle = tampered(int8_bundle, tmp_path / "b", mutate)
    with time_limit(120), pytest.raises(trainfer.BundleError, match=message):
        trainfer.Predictor.load(bundle)


@pytest.mark.parametrize(
    "options",
    [
        {"equalize": True},
        {"equalize": False, "calibration": "entropy"},
        {"gate": trainfer.AccuracyGate(max_rel_error=1e-5), "max_float_layers": 5},  # every layer falls back
        {"runtime": "openvino"},
    ],
)
def test_every_int8_form_quantize_makes_passes_the_cost_check(tmp_path, options):
    if options.get("runtime") == "openvino":
        pytest.importorskip("openvino")
    torch.manual_seed(0)
    samples = torch.rand(16, 1, 8, 8)
    settings = {"gate": trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None), "equalize": False}
    quantized = trainfer.quantize(digits_net().eval(), samples, sensitivity_samples=8, **{**settings, **options})
    bundle = quantized.save(tmp_path / "b")
    assert trainfer.Predictor.load(bundle).predict(samples[:2])  # loads: every check passed


def test_the_cost_check_counts_what_the_float_model_computes(int8_bundle):
    """digits_net's int8 form computes its float form's convolutions and matmuls: the same count."""
    model = check_int8_ops((int8_bundle / "quantized.onnx").read_bytes(), "quantized.onnx")
    reference = trainfer.load(int8_bundle)
    flops = float_flops(reference, [1, 1, 8, 8])
    weights = sum(t.numel() for t in reference.state_dict().values())
    check_int8_cost(model, [1, 1, 8, 8], weights, flops // 2, "quantized.onnx")  # counts at most 2x the float's
    with pytest.raises(trainfer.BundleError, match=re.escape(f"the float model computes {flops // 2 - 1:.3g}")):
        check_int8_cost(model, [1, 1, 8, 8], weights, flops // 2 - 1, "quantized.onnx")


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_int8_form_may_only_use_the_operators_trainfer_writes(int8_bundle, tmp_path, attack):
    mutate, message = ATTACKS[attack]
    bundle = tampered(int8_bundle, tmp_path / "b", mutate)
    with time_limit(120), pytest.raises(trainfer.BundleError, match=message.replace("(", r"\(")):
        trainfer.Predictor.load(bundle)


def test_the_command_line_refuses_it_in_one_line(int8_bundle, tmp_path, image):
    bundle = tampered(int8_bundle, tmp_path / "b", ATTACKS["Loop of 1e12 iterations"][0])
    with time_limit(120):
        result = CliRunner().invoke(main, ["predict", str(bundle), str(image)])
    assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
    assert "uses the ONNX operator 'Loop'" in result.output and "Traceback" not in result.output


def test_what_quantize_writes_passes_and_serves_what_the_file_computes(int8_bundle):
    import onnxruntime

    model = onnx.load(str(int8_bundle / "quantized.onnx"))
    assert {node.op_type for node in model.graph.node} <= INT8_OPS
    sample = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)).numpy()
    served = trainfer.Predictor.load(int8_bundle).predict(sample)
    session = onnxruntime.InferenceSession(str(int8_bundle / "quantized.onnx"), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: sample})[0])
    probabilities = logits.double().softmax(-1)
    assert [r.index for r in served] == probabilities.argmax(-1).tolist()
    assert [r.probability for r in served] == pytest.approx(probabilities.max(-1).values.tolist(), rel=1e-5)
