"""The attacker's view of a deploy-form bundle's ``architecture`` (trainfer.serve.architecture).

Every attack edits the manifest of a real deploy bundle and recomputes the description's sha256, as
an attacker would (the digest is integrity, not authenticity). Code execution is detected by a
marker file that the injected code would create; resource bombs run under a time limit (and, in a
subprocess, an address-space limit). Each attack must end in a :class:`trainfer.BundleError` or in a
model that computes exactly what the bundle computed before, with no marker file.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit
from torch import nn

import trainfer
from trainfer.serve.architecture import digest
from trainfer.testing import randomize_batchnorm

X = torch.randn(3, 1, 6, 6)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1), nn.Linear(144, 3), nn.Softmax(dim=1)
    )
    return trainfer.deploy(randomize_batchnorm(model).eval(), X)


@pytest.fixture(scope="module")
def deploy_bundle(tmp_path_factory):
    """A deploy-form bundle, its manifest and the outputs it must reproduce."""
    path = tmp_path_factory.mktemp("arch") / "bundle"
    deployed = _model()
    trainfer.save(deployed, path, example_inputs=X[:1])
    with torch.no_grad():
        expected = deployed(X)
    return path, json.loads((path / "manifest.json").read_text()), expected


def _resign(architecture: dict) -> dict:
    body = {key: value for key, value in architecture.items() if key != "sha256"}
    return {**body, "sha256": digest(body)}


def _write(tmp_path: Path, source: Path, manifest: dict) -> Path:
    bundle = tmp_path / "evil"
    bundle.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name != "manifest.json":
            (bundle / file.name).write_bytes(file.read_bytes())
    manifest = {**manifest, "architecture": _resign(manifest["architecture"])}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def _node(manifest: dict, op: str) -> dict:
    return next(node for node in manifest["architecture"]["nodes"] if node["op"] == op)


def _load_and_run(bundle: Path, expected: torch.Tensor, marker: Path) -> None:
    """Load and predict: a BundleError or the right answer, and never the marker file."""
    try:
        with time_limit(20):
            loaded = trainfer.load(bundle)
            with torch.no_grad():
                got = loaded(X)
    except trainfer.BundleError:
        pass
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not marker.exists(), "the manifest ran code"


def _payloads(marker: Path) -> list[str]:
    """Strings that fx would paste into the code it generates, if any reached it unchecked."""
    run = f"__import__('os').system('touch {marker}')"
    return [
        f"**{{}})\r{run}\rif 1:\r def _g(self):#",  # \r: not a line break for fx's re-indentation
        f"**{{}})\n    {run}\n    (0",  # inside forward: runs on every predict
        f"x\n{run}",
        f"x=1);{run};(0",
        f"x\u2028{run}",
        f"x\x0c{run}",
        f'x"); {run}; ("',
        "__class__",
        "x\n",  # `$` in re.match accepts a trailing newline
        "class",
        "ｘ",  # a non-ASCII identifier
    ]


@pytest.mark.parametrize("op", ["call_module", "call_function", "call_method"])
@pytest.mark.parametrize("where", ["kwarg-name", "node-name", "target"])
def test_strings_fx_would_paste_into_code_never_run(tmp_path, deploy_bundle, op, where):
    source, manifest, expected = deploy_bundle
    marker = tmp_path / "pwned"
    for index, payload in enumerate(_payloads(marker)):
        evil = copy.deepcopy(manifest)
        nodes = evil["architecture"]["nodes"]
        if op == "call_method":  # flatten is already a module; add a call_method view before the output
            last = nodes[-1]["args"][0]
            nodes.insert(-1, {"name": "m", "op": "call_method", "target": "mul", "args": [last, 1.0], "kwargs": {}})
            nodes[-1]["args"] = [{"node": "m"}]
        if op == "call_function":
            last = nodes[-1]["args"][0]
            nodes.insert(-1, {"name": "f", "op": "call_function", "target": "torch.mul", "args": [last, 1.0],
                              "kwargs": {}})  # fmt: skip
            nodes[-1]["args"] = [{"node": "f"}]
        node = _node(evil, op)
        if where == "kwarg-name":
            node["kwargs"][payload] = 1
        elif where == "node-name":
            old = node["name"]
            node["name"] = payload
            renamed = (json.dumps({"node": old}), json.dumps({"node": payload}))
            for other in nodes:
                other["args"] = json.loads(json.dumps(other["args"]).replace(*renamed))
        elif op == "call_module":  # the module's own path, in modules and in the node
            modules = evil["architecture"]["modules"]
            modules[payload] = modules.pop(node["target"])
            node["target"] = payload
        else:
            node["target"] = payload
        _load_and_run(_write(tmp_path / str(index), source, evil), expected, marker)


def test_placeholder_attribute_and_class_names_never_run(tmp_path, deploy_bundle):
    source, manifest, expected = deploy_bundle
    marker = tmp_path / "pwned"
    for index, payload in enumerate(_payloads(marker)):
        for field in ("placeholder", "class_name", "attribute", "output"):
            evil = copy.deepcopy(manifest)
            architecture = evil["architecture"]
            if field == "placeholder":
                _node(evil, "placeholder")["target"] = payload
            elif field == "class_name":
                architecture["class_name"] = payload
            elif field == "output":
                _node(evil, "output")["target"] = payload
            else:
                architecture["attributes"][payload] = {"kind": "parameter"}
            _load_and_run(_write(tmp_path / f"{field}{index}", source, evil), expected, marker)


@pytest.mark.parametrize("name", ["training", "__class__", "forward", "_modules", "graph", "code", "__init__"])
def test_module_names_that_shadow_module_internals_are_a_bundle_error(tmp_path, deploy_bundle, name):
    source, manifest, _ = deploy_bundle
    evil = copy.deepcopy(manifest)
    node = _node(evil, "call_module")
    modules = evil["architecture"]["modules"]
    modules[name] = modules.pop(node["target"])
    node["target"] = name
    with pytest.raises(trainfer.BundleError, match="architecture"):
        trainfer.load(_write(tmp_path, source, evil))


def _with_node(manifest: dict, target: str, args: list, kwargs: dict | None = None, op="call_function") -> dict:
    """``manifest`` with a node ``target(*args, **kwargs)`` before the output; "INPUT" in ``args`` is the
    input placeholder. Unused, it still runs: fx keeps every node in the code it generates."""
    evil = copy.deepcopy(manifest)
    nodes = evil["architecture"]["nodes"]
    args = [{"node": _node(evil, "placeholder")["name"]} if arg == "INPUT" else arg for arg in args]
    nodes.insert(-1, {"name": "bomb", "op": op, "target": target, "args": args, "kwargs": kwargs or {}})
    return evil


BOMBS = {
    "pow of huge ints": ("operator.pow", [7, 10**9]),
    "list repetition": ("operator.mul", [[0], 300_000_000]),
    "tuple repetition": ("operator.mul", [{"tuple": [0]}, 300_000_000]),
    "string repetition": ("operator.mul", ["x", 300_000_000]),
    "huge pad": ("torch.nn.functional.pad", ["INPUT", [30000] * 4]),
    "huge interpolate": ("torch.nn.functional.interpolate", ["INPUT"], {"scale_factor": 100000.0}),
    "huge expand": ("expand", ["INPUT", 100000, 100000, 6, 6], {}, "call_method"),
    "huge constant list": ("torch.add", ["INPUT", list(range(100_000))]),
    "many constant lists": ("torch.add", ["INPUT", [[0] * 4000] * 60]),
    "huge integer": ("operator.add", [2**70, 1]),
    "deep nested list": ("torch.add", ["INPUT", json.loads("[" * 200 + "]" * 200)]),
    "division by zero": ("operator.floordiv", [1, 0]),
}


def test_resource_bombs_in_the_architecture_are_refused_at_load(tmp_path, deploy_bundle):
    """Each bomb loads in one child process under a 3 GiB address-space limit and a 20 s alarm."""
    source, manifest, _ = deploy_bundle
    bundles = {name: str(_write(tmp_path / str(index), source, _with_node(manifest, *BOMBS[name])))
               for index, name in enumerate(sorted(BOMBS))}  # fmt: skip
    code = textwrap.dedent(
        f"""
        import json, resource, signal, trainfer
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("20 s")))
        for name, path in json.loads({json.dumps(json.dumps(bundles))}).items():
            signal.alarm(20)
            try:
                trainfer.load(path)
            except trainfer.BundleError as error:
                print(json.dumps([name, "refused", str(error)[:300]]))
            except BaseException as error:
                print(json.dumps([name, type(error).__name__, str(error)[:300]]))
            else:
                print(json.dumps([name, "loaded", ""]))
            signal.alarm(0)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = {name: (verdict, message) for name, verdict, message in map(json.loads, done.stdout.splitlines())}
    assert set(outcomes) == set(BOMBS)
    assert {name: verdict for name, (verdict, _) in outcomes.items()} == dict.fromkeys(BOMBS, "refused"), outcomes


def test_an_architecture_without_an_input_shape_is_refused(tmp_path, deploy_bundle):
    source, manifest, _ = deploy_bundle
    evil = {**copy.deepcopy(manifest), "input": {"shape": None, "dtype": "float32"}}
    with pytest.raises(trainfer.BundleError, match="input shape"):
        trainfer.load(_write(tmp_path, source, evil))


# --------------------------------------------------------------------------- the property test
ADVERSARIAL = st.sampled_from(
    [
        "\r", "\n", "\u2028", "\u2029", "\x85", "\x00", "'", '"', "\\", "__class__", "__import__('os')", "#",
        "x\n", " x", "x ", "class", "self", "torch", "ｘ", "x" * 300, "a.b", "0", "-1", "**{}", ")", "(",
    ]
)  # fmt: skip


def _string_paths(value, prefix=()):
    """Every path to a string value and every (path, key) of a dict key inside ``value``."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append(("key", (*prefix, key)))
            found += _string_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _string_paths(item, (*prefix, index))
    elif isinstance(value, str):
        found.append(("value", prefix))
    return found


def _replace(value, kind, path, new):
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "key":
        parent[new] = parent.pop(last)
    else:
        parent[last] = new


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_adversarial_strings_in_any_architecture_field_never_run_code(tmp_path, deploy_bundle, data):
    source, manifest, expected = deploy_bundle
    marker = tmp_path / "pwned"
    evil = copy.deepcopy(manifest)
    architecture = {key: value for key, value in evil["architecture"].items() if key != "sha256"}
    kind, path = data.draw(st.sampled_from(_string_paths(architecture)), label="where")
    piece = data.draw(ADVERSARIAL, label="piece")
    run = f"__import__('os').system('touch {marker}')"
    new = data.draw(st.sampled_from([piece, f"x{piece}{run}", f"{piece}{run}{piece}", f"**{{}}){piece}{run}"]))
    _replace(architecture, kind, path, new)
    evil["architecture"] = architecture
    _load_and_run(_write(tmp_path, source, evil), expected, marker)


def test_the_address_space_limit_of_the_bomb_tests_is_real():
    """The bombs above run under RLIMIT_AS: a sanity check that the limit can be set on this machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    assert hard == resource.RLIM_INFINITY or hard >= 3 << 30


@pytest.mark.parametrize(
    "node",
    [
        ("torch.nn.functional.softmax", ["INPUT"], {"dim": 7}),
        ("torch.softmax", ["INPUT", -9]),
        ("log_softmax", ["INPUT", 4], {}, "call_method"),
    ],
)
def test_a_softmax_over_a_dimension_the_input_lacks_is_refused_at_load(tmp_path, deploy_bundle, node):
    """PyTorch's meta kernels accept any softmax dim: the load-time run checks it (not the first prediction)."""
    source, manifest, _ = deploy_bundle
    with pytest.raises(trainfer.BundleError, match=r"softmax over dim -?\d of a 4-dimensional tensor"):
        trainfer.load(_write(tmp_path, source, _with_node(manifest, *node)))


def test_a_softmax_module_over_a_dimension_the_output_lacks_is_refused_at_load(tmp_path, deploy_bundle):
    source, manifest, _ = deploy_bundle
    evil = copy.deepcopy(manifest)
    softmax = next(spec for spec in evil["architecture"]["modules"].values() if spec["type"] == "Softmax")
    softmax["args"]["dim"] = 7
    with pytest.raises(trainfer.BundleError, match=r"softmax over dim 7 of a 2-dimensional tensor"):
        trainfer.load(_write(tmp_path, source, evil))


# --------------------------------------------------------------------------- found by a docs-only attacker
def _chain(manifest: dict, nodes: list[dict]) -> dict:
    """``manifest`` with ``nodes`` before its output (they run though nothing uses them)."""
    evil = copy.deepcopy(manifest)
    evil["architecture"]["nodes"][-1:-1] = nodes
    return evil


def _input_name(manifest: dict) -> dict:
    return {"node": _node(manifest, "placeholder")["name"]}


def test_many_tensors_each_under_the_limit_are_refused_together(tmp_path, deploy_bundle):
    """Forty 2**24-element tensors kept alive for one cat: 2.9 GB at predict, each within the per-tensor limit."""
    source, manifest, _ = deploy_bundle
    nodes = [{"name": "s", "op": "call_method", "target": "sum", "args": [_input_name(manifest)], "kwargs": {}}]
    for i in range(40):
        nodes.append({"name": f"e{i}", "op": "call_method", "target": "expand", "args": [{"node": "s"}, 2**24],
                      "kwargs": {}})  # fmt: skip
        nodes.append({"name": f"m{i}", "op": "call_function", "target": "operator.mul",
                      "args": [{"node": f"e{i}"}, 2.0], "kwargs": {}})  # fmt: skip
    with pytest.raises(trainfer.BundleError, match=r"tensors hold more than 16 x 16777216 elements in all"):
        trainfer.load(_write(tmp_path, source, _chain(manifest, nodes)))


def test_a_chain_of_big_matmuls_on_a_small_input_is_refused_for_its_work(tmp_path, deploy_bundle):
    """Three 2048x2048 matmuls: 5e10 operations for an 8x8 network's 1e3 weights."""
    source, manifest, _ = deploy_bundle
    nodes = [
        {"name": "s", "op": "call_method", "target": "sum", "args": [_input_name(manifest)], "kwargs": {}},
        {"name": "e", "op": "call_method", "target": "expand", "args": [{"node": "s"}, 2048, 2048], "kwargs": {}},
    ]
    for i in range(3):
        nodes.append({"name": f"mm{i}", "op": "call_function", "target": "torch.matmul",
                      "args": [{"node": "e"}, {"node": "e"}], "kwargs": {}})  # fmt: skip
    with pytest.raises(trainfer.BundleError, match=r"floating-point operations on its example input, over the limit"):
        trainfer.load(_write(tmp_path, source, _chain(manifest, nodes)))


def test_in_place_operators_and_flags_never_write_into_the_callers_input(tmp_path, deploy_bundle):
    """``x += 1000`` on the input, an in-place ReLU and dropout(training=True): rebuilt as inference computes."""
    source, manifest, expected = deploy_bundle
    evil = copy.deepcopy(manifest)
    evil.pop("preprocess", None)  # inputs served as given: no normalising copy
    name = _input_name(evil)
    first = next(node for node in evil["architecture"]["nodes"] if node["op"] == "call_module")
    evil["architecture"]["nodes"][1:1] = [
        {"name": "bump", "op": "call_function", "target": "operator.iadd", "args": [name, 1000.0], "kwargs": {}},
        {"name": "back", "op": "call_function", "target": "operator.sub",
         "args": [{"node": "bump"}, 1000.0], "kwargs": {}},
        {"name": "drop", "op": "call_function", "target": "torch.nn.functional.dropout", "args": [{"node": "back"}],
         "kwargs": {"p": 0.5, "training": True}},
        {"name": "act", "op": "call_function", "target": "torch.nn.functional.relu6", "args": [{"node": "drop"}, True],
         "kwargs": {}},
    ]  # fmt: skip
    first["args"] = [{"node": "drop"}]
    x = X.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", trainfer.BundleWarning)
        loaded = trainfer.load(_write(tmp_path, source, evil))
    with torch.no_grad():
        first_answer, second_answer = loaded(x), loaded(x)
    assert torch.equal(x, X), "the bundle wrote into its input"
    torch.testing.assert_close(first_answer, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(first_answer, second_answer)


def test_batch_norm_over_batch_statistics_is_not_an_inference_form(tmp_path, deploy_bundle):
    source, manifest, _ = deploy_bundle
    evil = copy.deepcopy(manifest)
    evil["architecture"]["modules"]["extra"] = {"type": "BatchNorm2d", "args": {"num_features": 1,
                                                "track_running_stats": False, "affine": False}}  # fmt: skip
    evil["architecture"]["nodes"][-1:-1] = [
        {"name": "bn", "op": "call_module", "target": "extra", "args": [_input_name(evil)], "kwargs": {}}
    ]
    with pytest.raises(trainfer.BundleError, match="without running statistics"):
        trainfer.load(_write(tmp_path, source, evil))


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)
        self.register_buffer("shift", torch.tensor([1.0, 2.0, 3.0]))

    def forward(self, x):
        return torch.sigmoid(self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))) + self.shift


def test_a_deploy_form_reading_a_buffer_round_trips(tmp_path):
    """A graph reading a buffer after a non-linearity (a get_attr node) records its shape: it loads and predicts."""
    deployed = trainfer.deploy(_WithBuffer().eval(), X)
    trainfer.save(deployed, tmp_path / "b", example_inputs=X[:1], task="regression")
    with torch.no_grad():
        torch.testing.assert_close(trainfer.load(tmp_path / "b")(X), deployed(X))


def test_a_chain_of_nodes_over_the_limit_is_refused_quickly(tmp_path, deploy_bundle):
    """A forged chain of MAX_NODES + 1 cheap nodes is refused before any of it is traced."""
    from trainfer.serve.architecture_rebuild import MAX_NODES

    source, manifest, _ = deploy_bundle
    evil = copy.deepcopy(manifest)
    nodes = evil["architecture"]["nodes"]
    previous = nodes[-1]["args"][0]
    extra = MAX_NODES + 1 - len(nodes)
    for index in range(extra):
        nodes.insert(
            -1, {"name": f"r{index}", "op": "call_function", "target": "torch.relu", "args": [previous], "kwargs": {}}
        )
        previous = {"node": f"r{index}"}
    nodes[-1]["args"] = [previous]
    assert len(nodes) == MAX_NODES + 1
    with (
        time_limit(20),
        pytest.raises(trainfer.BundleError, match=rf"{MAX_NODES + 1} nodes, over the limit of MAX_NODES = {MAX_NODES}"),
    ):
        trainfer.load(_write(tmp_path, source, evil))
