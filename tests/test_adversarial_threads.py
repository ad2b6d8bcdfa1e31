"""The attacker's threads: shared runtimes, saving a model in use, exporting from many threads.

Every attack runs many threads started together (:mod:`threads`, under a time limit) and checks
each answer against the single-threaded one: an error raised, another request's scores, a changed
BatchNorm buffer or a mode left switched is a failure. Attacks (issue 22, section 3):

* 16 threads on ``Predictor.load(bundle, runtime=...)`` for every runtime engine (torch,
  torch-channels-last, onnxruntime, openvino), and on an int8 bundle under onnxruntime and openvino;
* ``trainfer.save(model)`` from 4 threads while 16 threads predict with that model (in eval, and
  in training mode), and 8 threads saving one eval model at once;
* 8 threads of ``trainfer.compile(bundle, runtime="onnxruntime")`` and of ``trainfer.export``
  (onnx, torchscript) at once;
* ``trainfer.deploy(model)`` from 2 threads while 16 threads predict with that model (in eval,
  and in training mode).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from serving_models import FACTORY, save_bundle, trained
from threads import assert_same_state, hammer, probabilities, state, thread_inputs

import trainfer
from trainfer import Predictor
from trainfer.modes.contexts import snapshot_modes

THREADS = 16
SPEC = {"input_shape": [1, 8, 8]}
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_bundle(tmp_path_factory.mktemp("threads") / "b", 3, labels=["a", "b", "c"])


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """An int8 bundle of a small deploy form (a loose gate: the point here is threads, not accuracy)."""
    pytest.importorskip("onnxruntime")
    model = trained(5)
    calibration = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gate = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)  # passes any candidate, deliberately
    int8 = trainfer.quantize(model, calibration, gate=gate, equalize=False, sensitivity_samples=16)
    return int8.save(tmp_path_factory.mktemp("threads") / "int8", factory=FACTORY, preprocess=SPEC)


def assert_like_single_threaded(predictor: Predictor, threads: int = THREADS, calls: int = 12) -> None:
    """``threads`` threads on distinct inputs get exactly what one thread gets for the same input."""
    inputs = thread_inputs(threads, seed=threads)
    reference = [probabilities(predictor.predict(x, top_k=3)) for x in inputs]
    results = hammer(lambda x: predictor.predict(x, top_k=3), inputs, calls=calls)
    for index, answers in enumerate(results):
        for answer in answers:  # one engine, one input: the same computation every time
            np.testing.assert_allclose(probabilities(answer), reference[index], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- runtime engines
@pytest.mark.parametrize(
    "runtime",
    [
        "torch",
        "torch-channels-last",
        pytest.param("onnxruntime", marks=needs_ort),
        pytest.param("openvino", marks=[needs_ort, needs_openvino]),
    ],
)
def test_every_runtime_engine_serves_many_threads_like_one(bundle, runtime):
    predictor = Predictor.load(bundle, runtime=runtime)
    assert predictor.model.record.runtime == runtime
    assert_like_single_threaded(predictor)


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_an_int8_bundle_serves_many_threads_like_one(int8_bundle, runtime):
    predictor = Predictor.load(int8_bundle, runtime=runtime)
    assert (predictor.model.record.runtime, predictor.model.record.dtype) == (runtime, "int8")
    assert_like_single_threaded(predictor)


# --------------------------------------------------------------------------- saving a model in use
def _save_while_serving(model: torch.nn.Module, tmp_path, savers: int = 4) -> list:
    """16 threads predict with ``model`` while ``savers`` threads save it; returns the saved bundles."""
    predictor = Predictor(model, preprocess=SPEC)
    inputs = thread_inputs(THREADS)
    reference = [probabilities(predictor.predict(x, top_k=3)) for x in inputs]
    before, modes = state(model), snapshot_modes(model)
    paths = [tmp_path / f"saved{i}" for i in range(savers)]

    def work(index):
        if index < savers:  # a saver
            for _ in range(3):
                trainfer.save(model, paths[index], factory=FACTORY, preprocess=SPEC)
            return "saved"
        answers = [probabilities(predictor.predict(inputs[index - savers], top_k=3)) for _ in range(10)]
        return answers

    results = hammer(work, list(range(savers + THREADS)), calls=1)
    for index, [answers] in enumerate(results[savers:]):
        for answer in answers:
            np.testing.assert_allclose(answer, reference[index], rtol=1e-6, atol=1e-7)
    assert_same_state(model, before)
    assert snapshot_modes(model) == modes
    return paths


def _assert_bundles_serve(paths, model) -> None:
    x = thread_inputs(1)[0]
    with trainfer.inference(model):
        expected = model(x)
    for path in paths:
        loaded = trainfer.load(path).eval()  # a training form loads in the mode its factory builds
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)


def test_saving_an_eval_model_while_16_threads_serve_it(tmp_path):
    model = trained(11)
    paths = _save_while_serving(model, tmp_path)
    _assert_bundles_serve(paths, model)


def test_saving_a_training_model_while_16_threads_serve_it(tmp_path):
    model = trained(12).train()
    model[4].eval()  # a frozen BatchNorm inside a training model: its mode must survive too
    paths = _save_while_serving(model, tmp_path)
    assert model.training and not model[4].training
    _assert_bundles_serve(paths, model)


def test_eight_threads_saving_one_eval_model(tmp_path):
    model = trained(13)
    before, modes = state(model), snapshot_modes(model)
    paths = [tmp_path / f"b{i}" for i in range(8)]
    hammer(lambda path: trainfer.save(model, path, factory=FACTORY, preprocess=SPEC), paths, calls=2)
    assert_same_state(model, before)
    assert snapshot_modes(model) == modes
    _assert_bundles_serve(paths, model)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_deploying_a_model_while_16_threads_serve_it(mode):
    model = trained(14).train(mode == "train")
    predictor = Predictor(model, preprocess=SPEC)
    inputs = thread_inputs(THREADS)
    reference = [probabilities(predictor.predict(x, top_k=3)) for x in inputs]
    before, modes = state(model), snapshot_modes(model)
    example = torch.randn(2, 1, 8, 8)

    def work(index):
        if index < 2:
            return trainfer.deploy(model, example)
        return [probabilities(predictor.predict(inputs[index - 2], top_k=3)) for _ in range(10)]

    results = hammer(work, list(range(2 + THREADS)), calls=1)
    for index, [answers] in enumerate(results[2:]):
        for answer in answers:
            np.testing.assert_allclose(answer, reference[index], rtol=1e-6, atol=1e-7)
    assert_same_state(model, before)
    assert snapshot_modes(model) == modes
    with trainfer.inference(model):
        expected = model(inputs[0])
    for [deployed] in results[:2]:
        with torch.no_grad():
            torch.testing.assert_close(deployed(inputs[0]), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- exporters
@needs_ort
def test_eight_threads_compiling_one_bundle_for_onnxruntime(bundle):
    x = thread_inputs(1)[0]
    with torch.no_grad():
        expected = trainfer.load(bundle).eval()(x)
    compiled = hammer(lambda _: trainfer.compile(bundle, runtime="onnxruntime"), list(range(8)), calls=1)
    for [served] in compiled:
        torch.testing.assert_close(served(x), expected, rtol=1e-5, atol=1e-5)


@needs_ort
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_eight_threads_exporting_one_bundle(bundle, tmp_path, format):
    reports = hammer(
        lambda i: trainfer.export(bundle, tmp_path / f"m{i}.{'onnx' if format == 'onnx' else 'pt'}", format),
        list(range(8)),
        calls=1,
    )
    for [report] in reports:
        assert report.path.is_file() and report.max_rel_error <= 1e-5
