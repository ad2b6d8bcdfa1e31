"""``trainfer/__init__.py`` resolves its public names lazily (PEP 562); the public API is what it was.

EXPORTED is the table the eager ``__init__`` had (name -> the module it imported the name from),
frozen here on purpose: a name dropped or re-homed by accident fails, whatever the lazy table says.
"""

from __future__ import annotations

import ast
import importlib
import inspect as pyinspect
import json
import subprocess
import sys

import numpy as np
import pytest

import trainfer


def _table(spec: dict[str, str]) -> dict[str, str]:
    return {name: module for module, names in spec.items() for name in names.split()}


#: Every non-module public name ``dir(trainfer)`` listed before the lazy __init__, and where it came from.
EXPORTED = _table(
    {
        "trainfer._version": "__version__",
        "trainfer.analysis.audit": "audit",
        "trainfer.analysis.inspection": "Inspection LayerRecord inspect",
        "trainfer.errors": "AlgebraError BundleError BundleWarning DecodingError EquivalenceError InputError "
        "ModeError ModeWarning OutputKindWarning TrainferError WriteError WriteWarning",
        "trainfer.modes.contexts": "inference restore_modes snapshot_modes training",
        "trainfer.modes.dual": "DualModule infer_path train_only",
        "trainfer.modes.guard": "guard",
        "trainfer.recipe": "ModelRecipe attach_recipe recipe_of",
        "trainfer.registry": "register_model",
        "trainfer.reparam.deploy": "DeployReport deploy deploy_report",
        "trainfer.reparam.verify": "Equivalence verify",
        "trainfer.serve.bundle": "load save",
        "trainfer.serve.ensemble": "Ensemble",
        "trainfer.serve.export": "export",
        "trainfer.serve.gate": "AccuracyGate GateReport",
        "trainfer.serve.gated": "compile",
        "trainfer.serve.predictor": "Predictor",
        "trainfer.serve.preprocess": "PreprocessSpec",
        "trainfer.serve.prune": "PruningError prune",
        "trainfer.serve.quantize": "QuantizationError quantize",
        "trainfer.serve.runtime": "CompiledModel RuntimeRecord",
    }
)
#: The modules ``dir(trainfer)`` listed before (attribute -> module).
MODULES = {
    "algebra": "trainfer.reparam.algebra",
    **{
        name: f"trainfer.{name}"
        for name in "_moved _version analysis atomic bench blocks capture decoding digest errors extras jsonfile "
        "models modes numerics opcount recipe registry reparam serve validate".split()
    },
}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_every_previously_exported_name_is_the_object_of_its_home_module(name):
    assert getattr(trainfer, name) is getattr(importlib.import_module(EXPORTED[name]), name)
    assert name in dir(trainfer)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_previously_listed_module_is_reachable_as_an_attribute(name):
    assert getattr(trainfer, name) is importlib.import_module(MODULES[name])
    assert name in dir(trainfer)


def test_star_import_gives_all_and_the_same_objects():
    namespace: dict[str, object] = {}
    exec("from trainfer import *", namespace)  # a constant statement: the only way to test `import *`
    namespace.pop("__builtins__")
    assert set(namespace) == set(trainfer.__all__)
    assert set(trainfer.__all__) <= set(EXPORTED) | set(MODULES)
    for name, value in namespace.items():
        assert value is getattr(trainfer, name), name


def test_an_unknown_name_is_an_attribute_error_and_a_renamed_one_warns():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        trainfer.no_such_name  # noqa: B018
    with pytest.warns(DeprecationWarning, match="trainfer.explain is now trainfer.deploy_report"):
        assert trainfer.explain is trainfer.deploy_report
    assert "explain" not in dir(trainfer)  # a deprecated name is not advertised


def test_the_type_checking_imports_match_the_lazy_table():
    """What mypy and IDEs see is what the package gives at run time."""
    tree = ast.parse(pyinspect.getsource(trainfer))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen: dict[str, str] = {}
    for statement in block.body:
        assert isinstance(statement, ast.ImportFrom)
        for alias in statement.names:
            seen[alias.name] = statement.module or ""
    lazy = dict(trainfer._HOMES)
    lazy.update({name: module.rpartition(".")[0] for name, module in trainfer._SUBMODULES.items() if name in seen})
    assert seen == lazy


def test_import_trainfer_imports_no_submodule_that_needs_torch():
    probe = "import sys, trainfer; print(sorted(m for m in sys.modules if m.startswith('trainfer')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "['trainfer', 'trainfer._moved', 'trainfer._version']"


def test_a_fresh_interpreter_loads_and_predicts_a_bundle_naming_a_builtin_factory(tmp_path):
    """``trainfer.models:digits_net`` registers on import of ``trainfer.models``, which the lazy package
    never imports by itself: loading or predicting first thing in a new process must still find it."""
    from trainfer.models import digits_net

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    bundle = trainfer.save(
        digits_net(num_classes=10, width=8).eval(),
        tmp_path / "b",
        factory="trainfer.models:digits_net",
        config={"num_classes": 10, "width": 8},
        task="classification",
        preprocess={"input_shape": [1, 8, 8]},
    )
    probe = f"import trainfer; print(type(trainfer.load({str(bundle)!r})).__name__)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "DigitsNet"
    sample = tmp_path / "x.npy"
    np.save(sample, np.random.default_rng(0).random((1, 8, 8), dtype=np.float32))
    command = [sys.executable, "-m", "trainfer", "predict", str(bundle), str(sample), "--format", "jsonl"]
    predicted = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["label"] in [str(digit) for digit in range(10)]
