"""The Predictor: results equal the model's own numbers, for every task, output kind and structure."""

import logging
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agreement import assert_results_close, assert_same_classes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import trainfer
from trainfer import OutputKindWarning, Predictor
from trainfer.serve.predictor import pick_device
from trainfer.serve.results import BinaryResult, ClassificationResult, MultiHeadResult, RegressionResult
from trainfer.testing import randomize_batchnorm

FINALS = {
    "logits": lambda z: z,
    "probabilities": lambda z: torch.softmax(z, 1),
    "log_probabilities": lambda z: F.log_softmax(z, 1),
}


class Net(nn.Module):
    """A small CNN on 1x8x8 with BatchNorm and Dropout; ``final`` maps its logits to the output."""

    def __init__(self, classes: int = 4, final=FINALS["logits"]):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(3 * 64, classes)
        self.final = final

    def logits(self, x):
        return self.head(self.features(x).flatten(1))

    def forward(self, x):
        return self.final(self.logits(x))


def make(classes: int = 4, final: str = "logits", seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize_batchnorm(Net(classes, FINALS[final]), seed=seed)


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own numbers, computed by hand in eval mode."""
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(x)
        model.train(was)
    return out


SPEC = trainfer.PreprocessSpec(input_shape=(1, 8, 8))


@pytest.mark.parametrize("final", list(FINALS))
@pytest.mark.parametrize("declared", [False, True])
def test_classification_probabilities_equal_the_models_own(final, declared):
    model = make(5, final)
    x = torch.randn(7, 1, 8, 8)
    predictor = Predictor(model, preprocess=SPEC, output_kind=final if declared else None, labels=list("abcde"))
    assert predictor.heads[0].kind.kind == final
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutputKindWarning)
        results = predictor.predict(x, top_k=3)
    probabilities = {
        "logits": torch.softmax,
        "probabilities": lambda p, d: p,
        "log_probabilities": lambda lp, d: lp.exp(),
    }[final](reference(model, x), 1)
    top = probabilities.topk(3, dim=1)
    for result, values, indices in zip(results, top.values, top.indices, strict=True):
        assert isinstance(result, ClassificationResult)
        assert result.index == int(indices[0]) and result.label == "abcde"[result.index]
        assert result.probability == pytest.approx(float(values[0]), abs=1e-6)
        assert [label for label, _ in result.top_k] == ["abcde"[int(i)] for i in indices]
        np.testing.assert_allclose([p for _, p in result.top_k], values.tolist(), atol=1e-6, rtol=0)
    torch.testing.assert_close(predictor.scores(SPEC.prepare(x)), probabilities, atol=1e-6, rtol=0)


class Binary(nn.Module):
    def __init__(self, final: str, columns: int = 1):
        super().__init__()
        self.linear = nn.Linear(6, columns)
        self.final = final

    def forward(self, x):
        z = self.linear(x)
        if self.final == "sigmoid_module":
            return nn.functional.sigmoid(z).squeeze(1)
        return {"logits": z, "sigmoid": torch.sigmoid(z), "logsigmoid": F.logsigmoid(z)}[self.final]


@pytest.mark.parametrize(
    ("final", "kind"),
    [("logits", "logits"), ("sigmoid", "probabilities"), ("sigmoid_module", "probabilities")],
)
def test_binary_probability_and_threshold(final, kind):
    torch.manual_seed(1)
    model = Binary(final)
    x = torch.randn(20, 6)
    predictor = Predictor(model, task="binary", labels=["no", "yes"], threshold=0.3)
    assert predictor.heads[0].kind.kind == kind
    out = reference(model, x).reshape(-1)
    expected = torch.sigmoid(out) if kind == "logits" else out
    results = predictor.predict(x)
    assert all(isinstance(r, BinaryResult) for r in results)
    np.testing.assert_allclose([r.probability for r in results], expected.tolist(), atol=1e-6, rtol=0)
    assert [r.decision for r in results] == (expected >= 0.3).tolist()
    assert [r.label for r in results] == ["yes" if d else "no" for d in (expected >= 0.3).tolist()]
    assert results[0].to_record()["threshold"] == 0.3


def test_binary_log_probabilities_declared_and_two_column_logits():
    torch.manual_seed(2)
    x = torch.randn(9, 6)
    logsig = Binary("logsigmoid")
    results = Predictor(logsig, task="binary", output_kind="log_probabilities").predict(x)
    np.testing.assert_allclose([r.probability for r in results], reference(logsig, x).exp().reshape(-1), atol=1e-6)
    two = Binary("logits", columns=2)
    results = Predictor(two, task="binary").predict(x)
    np.testing.assert_allclose([r.probability for r in results], torch.softmax(reference(two, x), 1)[:, 1], atol=1e-6)


def test_contradicting_output_kind_warns_once_naming_both():
    model = make(4, "probabilities")
    predictor = Predictor(model, preprocess=SPEC, output_kind="logits")
    with pytest.warns(OutputKindWarning, match="declared output kind 'logits'.*declared by the caller"):
        predictor.predict(torch.randn(3, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutputKindWarning)
        predictor.predict(torch.randn(3, 1, 8, 8))  # first batch only
    with pytest.warns(OutputKindWarning, match="'probabilities'.*not \\[0, 1\\]"):
        Predictor(make(4, "logits"), preprocess=SPEC, output_kind="probabilities").predict(torch.randn(8, 1, 8, 8) * 5)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)


def test_regression_undoes_the_target_scaling():
    torch.manual_seed(3)
    model = Regressor()
    spec = trainfer.PreprocessSpec(
        input_shape=(3,), mean=[1.0, 2.0, 3.0], std=[2.0, 2.0, 4.0], target_mean=[100.0, -5.0], target_std=[10.0, 0.5]
    )
    raw = torch.randn(6, 3) * 3
    results = Predictor(model, task="regression", preprocess=spec, labels=["price", "rating"]).predict(raw)
    normalised = (raw - torch.tensor([1.0, 2.0, 3.0])) / torch.tensor([2.0, 2.0, 4.0])
    expected = reference(model, normalised) * torch.tensor([10.0, 0.5]) + torch.tensor([100.0, -5.0])
    assert all(isinstance(r, RegressionResult) for r in results)
    np.testing.assert_allclose([r.values for r in results], expected.tolist(), rtol=1e-6)
    assert results[0].to_record()["named"]["price"] == results[0].values[0]


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 6)
        self.digit = nn.Linear(6, 3)
        self.size = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"digit": torch.softmax(self.digit(h), 1), "size": self.size(h), "embedding": h}


def test_multi_head_gives_one_typed_result_per_head():
    torch.manual_seed(4)
    model = MultiTask()
    x = torch.randn(5, 8)
    predictor = Predictor(model, heads={"digit": "classification", "size": "regression"}, labels={"digit": "xyz"})
    assert predictor.heads[0].kind.kind == "probabilities"
    results = predictor.predict(x, top_k=2)
    out = reference(model, x)
    assert all(isinstance(r, MultiHeadResult) for r in results)
    for i, result in enumerate(results):
        assert result["digit"].probability == pytest.approx(float(out["digit"][i].max()), abs=1e-6)
        assert result["digit"].label == "xyz"[int(out["digit"][i].argmax())]
        assert result["size"].values == pytest.approx(out["size"][i].tolist(), abs=1e-6)
        assert set(result.to_record()) == {"digit", "size"}
    assert predictor.spec["task"] == "multi-head" and predictor.spec["heads"] == {
        "digit": "classification",
        "size": "regression",
    }
    scores = predictor.scores(x)
    assert set(scores) == {"digit", "size"}


def test_output_selects_among_tuple_outputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            z = self.linear(x)
            return torch.sigmoid(z), z

    torch.manual_seed(5)
    model = Pair()
    x = torch.randn(4, 4)
    chosen = Predictor(model, output=1)
    assert chosen.heads[0].kind.kind == "logits"
    np.testing.assert_allclose(
        [r.probability for r in chosen.predict(x)], torch.softmax(reference(model, x)[1], 1).max(1).values, atol=1e-6
    )
    with pytest.raises(ValueError, match="out of range"):
        Predictor(model, output=2)


def test_cache_hits_and_misses_and_same_results():
    model = make(3)
    x = torch.randn(6, 1, 8, 8)
    plain = Predictor(model, preprocess=SPEC)
    cached = Predictor(model, preprocess=SPEC, cache_size=8, batch_size=4)
    first = cached.predict(x)
    assert (cached.timings.cache_hits, cached.timings.cache_misses) == (0, 6)
    again = cached.predict(torch.cat([x[:3], torch.randn(2, 1, 8, 8)]))
    assert (cached.timings.cache_hits, cached.timings.cache_misses) == (3, 8)
    assert [r.probability for r in again[:3]] == [r.probability for r in first[:3]]  # cache hits: the same numbers
    assert_results_close(first, plain.predict(x))  # batches of 4 vs one of 6: equal within rounding
    cached.predict(torch.randn(10, 1, 8, 8))
    assert len(cached._cache) == 8  # LRU bounded


def test_predict_iter_streams_in_order_and_bounded():
    model = make(3)
    consumed = []
    samples = torch.randn(10, 1, 8, 8)

    def stream():
        for i, sample in enumerate(samples):
            consumed.append(i)
            yield sample

    predictor = Predictor(model, preprocess=SPEC, batch_size=4)
    iterator = predictor.predict_iter(stream())
    first = next(iterator)
    assert len(consumed) == 4  # one batch read, no more
    rest = list(iterator)
    expected = predictor.predict(samples)
    assert_results_close([first, *rest], expected)  # stacked samples vs slices of a tensor: other memory
    assert predictor.timings.batches == 3 + 3 and predictor.timings.samples == 20


def test_modes_and_weights_of_the_callers_model_are_untouched():
    model = make(3).train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = Predictor(model, preprocess=SPEC)
    x = torch.randn(5, 1, 8, 8)
    first = predictor.predict(x)
    second = predictor.predict(x)  # Dropout off and BatchNorm on running stats: deterministic
    assert [r.probability for r in first] == [r.probability for r in second]
    assert model.training and not model.features[1].training and model.features[3].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_through_the_predictor(tmp_path):
    predictor = Predictor(make(3), preprocess=SPEC, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="wrong channel count"):
        predictor.predict(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="empty input"):
        predictor.predict([])
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(torch.full((1, 8, 8), float("nan")))
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read image"):
        predictor.predict([str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="3 labels given, but the model outputs 4 classes"):
        Predictor(make(4), preprocess=SPEC, labels=["a", "b", "c"]).predict(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        predictor.predict(torch.zeros(1, 1, 8, 8), top_k=0)


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_top_k_on_a_model_that_ranks_nothing_is_refused_naming_its_task(task):
    """A binary or regression model has no ranking for ``top_k`` to cut: refused, never silently ignored."""
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)) if task == "binary" else Regressor()
    predictor = Predictor(model, task=task, preprocess={"input_shape": [3]})
    x = torch.randn(2, 3)
    assert len(predictor.predict(x)) == 2
    message = f"top_k applies to classification and sequence models only; this model's task is {task}: drop top_k"
    with pytest.raises(trainfer.InputError, match=message):
        predictor.predict(x, top_k=2)
    with pytest.raises(trainfer.InputError, match=message):
        next(predictor.predict_iter(x, top_k=2))
    with pytest.raises(trainfer.InputError, match=message):
        Predictor.ensemble([predictor, predictor]).predict(x, top_k=2)


def test_accepts_arrays_lists_single_samples_images_and_csv(tmp_path):
    model = make(3)
    spec = trainfer.PreprocessSpec(input_shape=(1, 8, 8), mean=[0.5], std=[0.25])
    predictor = Predictor(model, preprocess=spec)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "digit.png")
    raw = torch.from_numpy(pixels).float().div(255).view(1, 1, 8, 8)
    expected = torch.softmax(reference(model, (raw - 0.5) / 0.25), 1)[0]
    for inputs in [str(tmp_path / "digit.png"), raw, raw[0], raw.numpy(), raw.tolist(), [raw[0].numpy()]]:
        (result,) = predictor.predict(inputs)
        assert result.probability == pytest.approx(float(expected.max()), abs=1e-6)
    table = Predictor(Regressor(), task="regression", preprocess={"columns": ["a", "b", "c"], "input_shape": [3]})
    (tmp_path / "t.csv").write_text("c,b,a,extra\n3,2,1,9\n6,5,4,9\n")
    rows = table.predict(str(tmp_path / "t.csv"))
    expected_rows = reference(table.model, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    np.testing.assert_allclose([r.values for r in rows], expected_rows, rtol=1e-6)


def test_timings_and_debug_logging(caplog):
    predictor = Predictor(make(3), preprocess=SPEC, batch_size=2)
    with caplog.at_level(logging.DEBUG, logger="trainfer"):
        predictor.predict(torch.randn(5, 1, 8, 8))
    batches = [r for r in caplog.records if r.name == "trainfer" and "batch" in r.getMessage()]
    assert len(batches) == 3 and "forward" in batches[0].getMessage()
    timings = predictor.timings.to_dict()
    assert timings["samples"] == 5 and timings["batches"] == 3 and timings["forward"] > 0
    assert len(predictor.timings.history) == 3


def test_predictor_load_from_bundle_reuses_manifest(tmp_path):
    model = make(4, "log_probabilities")
    spec = trainfer.PreprocessSpec(input_shape=(1, 8, 8), mean=[0.1], std=[0.9])
    trainfer.save(model, tmp_path / "b", factory=f"{__name__}:bundle_factory", labels=list("wxyz"), preprocess=spec)
    predictor = Predictor.load(tmp_path / "b", batch_size=3)
    assert predictor.heads[0].kind.kind == "log_probabilities"
    assert "traced eval graph" in predictor.heads[0].kind.decided_by
    assert predictor.spec["labels"] == list("wxyz") and predictor.batch_size == 3
    raw = torch.rand(4, 1, 8, 8)
    expected = reference(model, (raw - 0.1) / 0.9).exp()
    np.testing.assert_allclose([r.probability for r in predictor.predict(raw)], expected.max(1).values, atol=1e-6)


@trainfer.register_model
def bundle_factory():
    return Net(4, FINALS["log_probabilities"])


def test_float64_models_predict_in_float64():
    model = make(3).double()
    predictor = Predictor(model)
    assert predictor.preprocess_spec.dtype == "float64"
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(predictor.scores(x), torch.softmax(reference(model, x), 1), rtol=0, atol=1e-12)


def test_device_choice():
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    for holds_no_data in ("meta", "xla"):  # devices torch knows that cannot serve: named, not a crash later
        with pytest.raises(ValueError, match=rf"device '{holds_no_data}': expected auto, cpu, cuda, cuda:N or mps"):
            pick_device(holds_no_data)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0' is not available"):
            pick_device("cuda:0")


def test_explain_and_ensemble_delegate(monkeypatch):
    calls = []
    fake_attribution = types.ModuleType("trainfer.analysis.attribution")
    fake_attribution.explain = lambda predictor, inputs, method, target: calls.append((predictor, method, target)) or 7
    monkeypatch.setitem(sys.modules, "trainfer.analysis.attribution", fake_attribution)
    monkeypatch.setattr(
        "trainfer.serve.predictor.Ensemble", lambda predictors, weights: ("ensemble", list(predictors), weights)
    )
    predictor = Predictor(make(3), preprocess=SPEC)
    assert predictor.explain(torch.zeros(1, 1, 8, 8), method="saliency", target=2) == 7
    assert calls == [(predictor, "saliency", 2)]
    assert Predictor.ensemble([predictor], weights=[1.0]) == ("ensemble", [predictor], [1.0])


def test_scores_keep_gradients_for_attribution():
    model = make(3)
    predictor = Predictor(model, preprocess=SPEC)
    batch = torch.randn(2, 1, 8, 8, requires_grad=True)
    model.eval()
    predictor.scores(batch)[:, 0].sum().backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0


def test_top_k_above_the_class_count_is_refused_naming_both_before_any_forward_when_labelled():
    """Ranking more classes than there are would silently return them all: refused, one line naming the
    class count and the value, before the forward where the labels give the count; on the scores else."""
    model = make(3)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    labelled = Predictor(model, preprocess=SPEC, labels=["a", "b", "c"])
    x = torch.randn(2, 1, 8, 8)
    assert [len(r.top_k) for r in labelled.predict(x, top_k=3)] == [3, 3]
    forwards.clear()
    message = "top_k 4 is more than the 3 classes: give at most 3"
    for refused in (labelled, Predictor.ensemble([labelled, labelled])):
        with pytest.raises(trainfer.InputError, match=message):
            refused.predict(x, top_k=4)
    assert not forwards, "the model ran for a top_k refused by its labels"
    with pytest.raises(trainfer.InputError, match=message):  # unlabelled: known from the scores
        Predictor(model, preprocess=SPEC).predict(x, top_k=4)


def test_top_k_above_a_heads_class_count_is_refused_naming_the_head():
    predictor = Predictor(MultiTask(), heads={"digit": "classification", "size": "regression"}, labels={"digit": "xyz"})
    with pytest.raises(trainfer.InputError, match="top_k 4 is more than the 3 classes of head 'digit': give at most 3"):
        predictor.predict(torch.randn(2, 8), top_k=4)


def test_top_k_of_a_sequence_head_is_bounded_by_the_hypotheses_a_decoder_returns():
    from trainfer.serve.decoder_bounds import MAX_SERVED_BEAM_WIDTH
    from trainfer.serve.outputs import Head
    from trainfer.serve.results import check_top_k

    heads = [Head(None, None, "sequence", labels=("-", "a"))]  # 2 tokens: top_k counts hypotheses, not tokens
    assert check_top_k(MAX_SERVED_BEAM_WIDTH, heads) == MAX_SERVED_BEAM_WIDTH
    message = f"--top-k {MAX_SERVED_BEAM_WIDTH + 1} is more than the {MAX_SERVED_BEAM_WIDTH} hypotheses"
    with pytest.raises(trainfer.InputError, match=message):
        check_top_k(MAX_SERVED_BEAM_WIDTH + 1, heads, name="--top-k")


@settings(max_examples=15)
@given(
    classes=st.integers(2, 6),
    batch=st.integers(1, 9),
    batch_size=st.integers(1, 4),
    final=st.sampled_from(list(FINALS)),
    seed=st.integers(0, 50),
)
def test_any_batching_gives_the_models_probabilities(classes, batch, batch_size, final, seed):
    model = make(classes, final, seed)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    own = reference(model, x)
    expected = own if final == "probabilities" else torch.softmax(own, 1) if final == "logits" else own.exp()
    predictor = Predictor(model, preprocess=SPEC, batch_size=batch_size)
    results = predictor.predict(x, top_k=classes)
    assert predictor.timings.batches == -(-batch // batch_size)  # really served in batches of batch_size
    probabilities = torch.tensor([[dict(r.top_k)[str(c)] for c in range(classes)] for r in results])  # labels "0".."n"
    torch.testing.assert_close(probabilities, expected.double(), atol=1e-6, rtol=0, check_dtype=False)
    assert_same_classes(probabilities, expected, atol=1e-6)
    assert [r.index for r in results] == probabilities.argmax(1).tolist()
    assert all(len(r.top_k) == classes for r in results)


def test_predictor_load_overrides_recorded_settings(tmp_path):
    model = make(4, "probabilities")
    trainfer.save(
        model,
        tmp_path / "b",
        factory=f"{__name__}:probabilities_factory",
        preprocess=SPEC,
        output_kind="logits",
        labels=list("wxyz"),
    )
    assert trainfer.serve.bundle.read_manifest(tmp_path / "b").heads[0].output_kind == "logits"
    fixed = Predictor.load(tmp_path / "b", output_kind="probabilities")
    assert fixed.heads[0].kind.kind == "probabilities" and fixed.labels == list("wxyz")
    with pytest.raises(trainfer.BundleError, match="softmax would be applied twice"):
        Predictor.load(tmp_path / "b", labels=list("abcd"))  # the recorded kind contradicts the model
    x = torch.randn(3, 1, 8, 8)
    expected = reference(model, x).max(1).values
    np.testing.assert_allclose([r.probability for r in fixed.predict(x)], expected, atol=1e-6)


@trainfer.register_model
def probabilities_factory():
    return Net(4, FINALS["probabilities"])


@trainfer.register_model
def masked_logits_factory(final: str = "logits"):
    return Net(3, lambda z: FINALS[final](z + torch.tensor([0.0, -torch.inf, 0.0])))


@pytest.mark.parametrize("final", ["logits", "log_probabilities"])
def test_a_masked_class_of_minus_inf_logits_loads_and_serves_its_probability_zero(tmp_path, final):
    """The load's check of finite outputs refuses NaN and +inf, not the -inf of a masked class in logits or
    log-probabilities: probability 0, a legitimate output."""
    torch.manual_seed(0)
    model = randomize_batchnorm(masked_logits_factory(final), seed=0)
    factory, labels = f"{__name__}:masked_logits_factory", ["a", "b", "c"]
    trainfer.save(model, tmp_path / "b", factory=factory, config={"final": final}, preprocess=SPEC, labels=labels)
    results = Predictor.load(tmp_path / "b").predict(torch.randn(4, 1, 8, 8), top_k=3)
    assert all(dict(r.top_k)["b"] == 0.0 for r in results)


def test_to_records_are_json_lines():
    import json

    from trainfer.serve.results import to_records

    results = Predictor(make(3), preprocess=SPEC, labels=["a", "b", "c"]).predict(torch.randn(2, 1, 8, 8), top_k=2)
    lines = [json.dumps(record) for record in to_records(results)]
    assert [json.loads(line)["label"] for line in lines] == [r.label for r in results]
    assert json.loads(lines[0])["top_k"][0] == [results[0].top_k[0][0], results[0].top_k[0][1]]


def test_a_float64_model_overrides_the_specs_default_dtype(tmp_path):
    model = make(4, "log_probabilities").double()
    spec = trainfer.PreprocessSpec(input_shape=(1, 8, 8), mean=[0.5], std=[2.0])  # dtype left at float32
    trainfer.save(model, tmp_path / "b", factory=f"{__name__}:bundle_factory", preprocess=spec)
    assert trainfer.serve.bundle.read_manifest(tmp_path / "b").input.dtype == "float64"
    predictor = Predictor.load(tmp_path / "b")
    raw = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    expected = reference(model, (raw - 0.5) / 2.0).exp()
    torch.testing.assert_close(predictor.scores(predictor.preprocess(raw)), expected, rtol=0, atol=1e-12)
    assert Predictor(model, preprocess=spec).preprocess_spec.dtype == "float64"


def test_options_after_the_model_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        Predictor(make(3), "classification")
    assert Predictor(make(3), task="classification", preprocess=SPEC).heads[0].task == "classification"


def test_the_predictor_serves_and_the_ensemble_module_owns_its_construction():
    """``Predictor.load``'s decisions live in serve/served_model.py; the constructor takes no resolved heads;
    the ensemble module never imports the predictor (not even for annotations): no cycle in either direction."""
    import ast
    import inspect
    from pathlib import Path

    import trainfer.serve.ensemble as ensemble_module

    assert "resolved_heads" not in inspect.signature(Predictor).parameters
    tree = ast.parse(Path(ensemble_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("trainfer.serve.predictor")}
    assert isinstance(Predictor.ensemble([Predictor(make(3), preprocess=SPEC)]), ensemble_module.Ensemble)
