"""trainfer.attribution: Captum explanations in eval mode with gradients, restored state, files."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import trainfer
from trainfer import atomic
from trainfer.analysis import attribution_files, attribution_ig
from trainfer.analysis.attribution import attribute, explain, explain_to_files
from trainfer.analysis.attribution_files import explain_each
from trainfer.analysis.attribution_methods import explain_batch
from trainfer.analysis.attribution_options import MAX_STEPS
from trainfer.analysis.attribution_plots import AttributionPlotter, plot_attribution
from trainfer.errors import (
    ExplanationError,
    ExplanationsIncomplete,
    ExplanationWarning,
    ModeError,
    NonFiniteError,
)
from trainfer.models import digits_net
from trainfer.serve.predictor import Predictor
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.testing import randomize_batchnorm


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(108, 4)
    )
    return randomize_batchnorm(model).double()


@settings(max_examples=15)
@given(
    features=st.integers(1, 7),
    classes=st.integers(2, 5),
    batch=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_integrated_gradients_of_a_linear_model_is_weight_times_input_minus_baseline(
    features, classes, batch, dtype, seed
) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(features, classes).to(dtype)
    x = torch.randn(batch, features, generator=generator, dtype=dtype)
    baseline = torch.randn(1, features, generator=generator, dtype=dtype)
    result = attribute(model, x, baselines=baseline)
    target = model(x).argmax(dim=1)
    assert torch.equal(result.target, target)
    expected = model.weight[target].detach() * (x - baseline)
    # Exact in exact arithmetic; Captum's quadrature weights are float32, hence 1e-6 in both dtypes.
    torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-6 * float(expected.abs().max()) + 1e-30)
    assert result.values.dtype == dtype and result.values.shape == x.shape


def test_integrated_gradients_completeness_through_a_conv_net_with_batchnorm() -> None:
    model = conv_net()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    result = attribute(model, x)
    with torch.no_grad():
        model.eval()
        rows = torch.arange(3)
        gap = model(x)[rows, result.target] - model(torch.zeros_like(x))[rows, result.target]
    assert torch.allclose(result.values.sum(dim=(1, 2, 3)), gap, rtol=0, atol=1e-6 * float(gap.abs().max()))
    assert torch.allclose(result.scores, model(x)[rows, result.target].detach())


@pytest.mark.parametrize(("examples", "most_rows"), [(1, 8), (3, 6), (12, 12)])
def test_integrated_gradients_runs_the_path_in_chunks_of_at_most_8_rows(examples, most_rows) -> None:
    """Not n_steps (50) rows per example at once: whole steps of every example, at most 8 rows or one step."""
    model = conv_net()
    rows: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows.append(len(x))
        return model(x)

    x = torch.randn(examples, 1, 6, 6, dtype=torch.float64)
    result = attribute(model, x, forward=forward)
    assert max(rows[1:]) == most_rows  # rows[0]: the scores of the batch itself, before the path
    assert sum(rows) == examples * (1 + 50 + 2)  # the batch, 50 steps, then f(x) and f(x0) for the gap
    assert result.details["completeness_gap"].abs().max() < 1e-6


@pytest.mark.parametrize(("n_steps", "rows"), [(1, None), (7, 3), (50, None), (50, 40)])
def test_integrated_gradients_are_captums_gauss_legendre_integrated_gradients(n_steps, rows) -> None:
    """trainfer computes Captum's default integrated gradients itself (Captum's rule costs O(n_steps**3))."""
    from captum.attr import IntegratedGradients

    model = conv_net().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    baseline = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    chunks = {} if rows is None else {"internal_batch_size": rows}
    result = attribute(model, x, target=[0, 2, 3], n_steps=n_steps, baselines=baseline, **chunks)
    target = torch.tensor([0, 2, 3])
    expected, delta = IntegratedGradients(model).attribute(
        x, baseline, target=target, n_steps=n_steps, return_convergence_delta=True
    )
    scale = float(expected.abs().max())
    torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-6 * scale)  # Captum's weights are float32
    torch.testing.assert_close(result.details["completeness_gap"], delta, rtol=0, atol=1e-6 * scale)


def test_the_path_rule_is_gauss_legendre_on_the_unit_interval() -> None:
    for n_steps in (1, 2, 64, 301):
        points, weights = attribution_ig.path_rule(n_steps)
        nodes, node_weights = np.polynomial.legendre.leggauss(n_steps)
        np.testing.assert_allclose(points, 0.5 * (1 + nodes), rtol=0, atol=1e-13)
        np.testing.assert_allclose(weights, 0.5 * node_weights, rtol=0, atol=1e-13)


def test_the_most_steps_need_no_dense_eigensolver(monkeypatch) -> None:
    """NumPy's ``leggauss`` (Captum's rule) solves a dense n x n eigenproblem: minutes at 10000 steps."""

    def dense(*args, **kwargs):
        raise AssertionError("a dense eigensolver ran: O(n_steps**3)")

    monkeypatch.setattr(np.linalg, "eigvalsh", dense)
    attribution_ig.path_rule.cache_clear()
    model = nn.Linear(3, 2).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    result = attribute(model, x, n_steps=MAX_STEPS, internal_batch_size=2 * MAX_STEPS)
    torch.testing.assert_close(result.values, model.weight[result.target].detach() * x)


def test_saliency_and_occlusion_of_a_linear_model() -> None:
    model = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    saliency = attribute(model, x, "saliency", target=2)
    assert not x.requires_grad and x.grad is None  # the caller's batch is left alone
    assert torch.allclose(saliency.values, model.weight[2].detach().abs().expand(4, 5))
    occlusion = attribute(model, x, "occlusion", target=[0, 1, 2, 0])
    assert torch.allclose(occlusion.values, model.weight[[0, 1, 2, 0]].detach() * x)


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency", "occlusion"])
def test_every_method_gives_the_input_shape_and_restores_modes_and_grad_state(method) -> None:
    model = conv_net()
    model[1].eval()  # mixed modes must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        result = attribute(model, x, method, n_steps=8) if method == "integrated_gradients" else None
        result = result or attribute(model, x, method)
        assert not torch.is_grad_enabled()
    assert result.values.shape == x.shape and result.inputs.shape == x.shape
    assert seen and not any(training for training, _ in seen)  # every forward in eval mode
    if method == "integrated_gradients":  # its completeness check measures f(x) and f(x0) last, without gradients
        assert [grad for _, grad in seen[-2:]] == [False, False]
        seen = seen[:-2]
    assert all(grad for _, grad in seen) or method == "occlusion"  # with gradients (occlusion needs none)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())


def test_modes_and_grad_state_restored_when_the_forward_raises() -> None:
    model = conv_net()
    before = {name: m.training for name, m in model.named_modules()}

    def failing(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > 2:  # the probe passes, the integrated-gradients pass fails
            raise RuntimeError("boom")
        return model(batch)

    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            attribute(model, torch.randn(2, 1, 6, 6, dtype=torch.float64), forward=failing)
        assert not torch.is_grad_enabled()
    assert {name: m.training for name, m in model.named_modules()} == before


def test_inference_mode_is_refused_with_the_reason() -> None:
    model = conv_net()
    with torch.inference_mode(), pytest.raises(ModeError, match="need gradients.*inference_mode"):
        attribute(model, torch.randn(2, 1, 6, 6, dtype=torch.float64))
    assert model.training
    predictor = Predictor(model, preprocess=PreprocessSpec(input_shape=(1, 6, 6), dtype="float64"))
    with trainfer.inference(predictor.model), pytest.raises(ModeError, match="trainfer.inference"):
        predictor.explain(torch.randn(2, 1, 6, 6))


def test_scores_without_gradients_are_refused() -> None:
    model = nn.Linear(3, 2).double()

    def detached(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(batch)

    with pytest.raises(ModeError, match="without gradients"):
        attribute(model, torch.randn(2, 3, dtype=torch.float64), forward=detached)


def test_inference_tensors_from_preprocessing_are_accepted() -> None:
    with torch.inference_mode():
        batch = torch.randn(2, 3, dtype=torch.float64)
    assert attribute(nn.Linear(3, 2).double(), batch).values.shape == (2, 3)


def test_missing_captum_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r"explaining predictions needs captum.*pip install 'trainfer\[explain\]'"):
        attribute(nn.Linear(3, 2), torch.randn(2, 3))


def test_binary_and_regression_scores() -> None:
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    x = torch.randn(3, 4)
    result = attribute(single, x)
    assert result.target is None and result.scores.shape == (3,)
    torch.testing.assert_close(result.values, single[0].weight.detach() * x)
    column = attribute(nn.Linear(4, 1), x)
    assert column.target.tolist() == [0, 0, 0]
    three = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="regression model with 3 outputs: pass target="):
        attribute(three, x, task="regression")
    torch.testing.assert_close(attribute(three, x, target=1, task="regression").values, three.weight[1].detach() * x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "anchors"}, ValueError, r"one of \['integrated_gradients', 'saliency', .*\]; got 'anchors'"),
        ({"target": 3}, ValueError, r"index the 3 outputs \(0\.\.2\); got 3"),
        ({"target": [0, 1]}, ValueError, "one class index or one per example"),
        ({"batch": torch.ones(2, 3, dtype=torch.long)}, TypeError, "floating-point batch.*int64.*\\(2, 3\\)"),
        ({"batch": torch.ones(3)}, TypeError, "batch \\(N, ...\\); got a float32 tensor of shape \\(3,\\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    batch = kwargs.pop("batch", torch.randn(3, 4))
    with pytest.raises(error, match=match):
        attribute(nn.Linear(4, 3), batch, **kwargs)


def _table_predictor(model: nn.Module, task: str = "classification", **spec) -> Predictor:
    return Predictor(model, task=task, preprocess=PreprocessSpec(input_shape=(3,), dtype="float64", **spec))


def test_predictor_explain_is_explain_of_the_predictor_options_included() -> None:
    """docs/inspection.md: ``predictor.explain(...)`` = ``trainfer.analysis.attribution.explain(predictor, ...)``."""
    torch.manual_seed(0)
    predictor = _table_predictor(nn.Linear(3, 4).double())
    rows = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]
    signed = predictor.explain(rows, method="saliency", target=1, abs=False)
    assert (signed.values < 0).any()  # abs=False reached Captum
    torch.testing.assert_close(signed.values, explain(predictor, rows, "saliency", 1, abs=False).values)
    steps = {"n_steps": 3, "baselines": 0.5}
    torch.testing.assert_close(predictor.explain(rows, **steps).values, explain(predictor, rows, **steps).values)


def test_explain_uses_the_predictors_preprocessing_and_served_probabilities() -> None:
    torch.manual_seed(0)
    predictor = _table_predictor(nn.Linear(3, 4).double(), mean=(1.0,), std=(2.0,))
    rows = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]
    result = predictor.explain(rows)
    batch = (torch.tensor(rows, dtype=torch.float64) - 1.0) / 2.0
    assert torch.equal(result.inputs, batch)
    probabilities = predictor.scores(batch)
    assert torch.equal(result.target, probabilities.argmax(dim=1))
    torch.testing.assert_close(result.scores, probabilities.max(dim=1).values)
    at_baseline = predictor.scores(torch.zeros(2, 3, dtype=torch.float64))[[0, 1], result.target]
    torch.testing.assert_close(result.values.sum(dim=1), result.scores - at_baseline, rtol=0, atol=1e-6)


def _two_class_linear(scale: float) -> Predictor:
    """Logits ``scale * (x0 - x1, x1 - x0)``: at the zero baseline both classes are at 0.5; with a
    ``scale`` of 1e4 the softmax is one-hot a thousandth of the way from there to ``x = (1, 0)``."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(scale * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        model.bias.zero_()
    return Predictor(model, task="classification", preprocess=PreprocessSpec(input_shape=(2,)))


def test_integrated_gradients_of_a_saturated_probability_is_refused_never_a_silent_zero_map() -> None:
    """The probability's gradient p (1 - p) vanishes past the first thousandth of the path: the
    quadrature's map is about zero while f(x) - f(x0) = 0.5. Occlusion, which the message offers, explains it."""
    x = [[1.0, 0.0]]
    expected = r"completeness check for example\(s\) \[0\].*expected f\(x\) - f\(x0\) = 0.5 "
    with pytest.raises(ExplanationError, match=expected):
        _two_class_linear(1e4).explain(x)
    occluded = _two_class_linear(1e4).explain(x, method="occlusion")
    torch.testing.assert_close(occluded.values, torch.tensor([[0.5, 0.0]]))  # x0 in column 0: 1 -> 0.5

    unsaturated = _two_class_linear(1.0).explain(x)  # the same model at a scale where it does not saturate
    assert abs(float(unsaturated.values.sum()) - (float(unsaturated.scores[0]) - 0.5)) < 1e-4
    assert float(unsaturated.details["completeness_gap"].abs().max()) < 1e-4


def test_explain_to_files_writes_every_example_it_can_and_names_each_it_cannot(tmp_path) -> None:
    """Examples 1 and 3 saturate (their completeness fails); 0 and 2 sit near the baseline and are written."""
    x = torch.tensor([[1e-6, 0.0], [1.0, 0.0], [0.0, 1e-6], [0.0, 1.0]])
    with pytest.warns(ExplanationWarning) as warned, pytest.raises(ExplanationsIncomplete) as raised:
        explain_to_files(_two_class_linear(1e4), x, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["000.png", "002.png"]
    assert [path.name for path in raised.value.written] == ["000.png", "002.png"]
    assert [(i, name) for i, name, _ in raised.value.failed] == [(1, "001.png"), (3, "003.png")]
    said = [str(w.message) for w in warned if w.category is ExplanationWarning]
    assert len(said) == 2 and said[1].startswith(
        "example 3 (003.png) not explained: integrated gradients failed its completeness check for example(s) [3]"
    )
    assert str(raised.value).startswith("2 of 4 examples could not be explained (each named above): 1 (001.png), 3")


def test_explain_refuses_non_finite_scores_with_predicts_error(tmp_path) -> None:
    class LogOf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x).repeat(1, 2)  # NaN for a negative input

    predictor = _table_predictor(LogOf())
    rows = [[1.0, 2.0, 3.0], [1.0, -2.0, 3.0]]
    with pytest.raises(NonFiniteError, match=r"output for input sample\(s\) \[1\] holds NaN or inf") as predicted:
        predictor.predict(rows)
    with pytest.raises(NonFiniteError) as explained:
        predictor.explain(rows)
    assert str(explained.value) == str(predicted.value)
    with pytest.warns(ExplanationWarning), pytest.raises(ExplanationsIncomplete) as drawn:  # predict --explain
        explain_to_files(predictor, rows, tmp_path)
    assert drawn.value.failed[1] == (1, "001.png", str(predicted.value))  # predict's words, one example at a time
    assert "NaN or inf between the baseline and the input of example(s) [0]" in drawn.value.failed[0][2]
    with pytest.raises(NonFiniteError, match=r"NaN or inf between the baseline and the input of example\(s\) \[0\]"):
        predictor.explain(rows[:1])  # finite at x, not at the zero baseline: log(0)


def test_explain_binary_and_unscaled_regression_predictors() -> None:
    torch.manual_seed(0)
    rows = torch.randn(2, 3, dtype=torch.float64)
    binary = explain(_table_predictor(nn.Linear(3, 1).double(), "binary"), rows)
    assert binary.target is None and binary.scores.shape == (2,) and ((binary.scores > 0) & (binary.scores < 1)).all()
    model = nn.Linear(3, 2).double()
    regression = _table_predictor(model, "regression", target_mean=(5.0, 1.0), target_std=(10.0, 3.0))
    with pytest.raises(ValueError, match="regression model with 2 outputs"):
        explain(regression, rows)
    result = explain(regression, rows, target=1)
    torch.testing.assert_close(result.values, 3.0 * model.weight[1].detach() * rows)  # in served units
    torch.testing.assert_close(result.scores, regression.scores(rows)[:, 1])


def test_explain_to_files_draws_image_heat_maps_and_table_bars(tmp_path) -> None:
    images = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((torch.rand(6, 6) * 255).to(torch.uint8).numpy(), mode="L").save(path)
        images.append(path)
    spec = PreprocessSpec(input_shape=(1, 6, 6), dtype="float64")
    predictor = Predictor(conv_net(), labels=["a", "b", "c", "d"], preprocess=spec)
    listed = []
    real_listdir = os.listdir
    with pytest.MonkeyPatch.context() as patch:  # the run's PNGs share a directory, listed once, not once a PNG
        patch.setattr(atomic.os, "listdir", lambda path: listed.append(Path(path)) or real_listdir(path))
        written = explain_to_files(predictor, images, tmp_path / "maps")
    assert [p.name for p in written] == ["000_digit0.png", "001_digit1.png"]
    assert listed.count(tmp_path / "maps") == 1
    table = _table_predictor(nn.Linear(3, 2).double(), columns=("u", "v", "w"))
    bars = explain_to_files(table, [[1.0, 2.0, 3.0]], tmp_path / "bars", method="occlusion")
    assert [p.name for p in bars] == ["000.png"]
    for path in [*written, *bars]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["000_digit0.png", "001_digit1.png"]


def _digit_pngs(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray((torch.rand(6, 6) * 255).to(torch.uint8).numpy(), mode="L").save(directory / f"digit{i}.png")
    return [directory / f"digit{i}.png" for i in range(count)]


def test_explain_to_files_names_each_example_after_its_file_and_row_whatever_files_are_mixed_in(tmp_path) -> None:
    """``digit0.png`` was explained as ``000_digit0.png`` alone but ``000.png`` beside a ``.npy`` file: names
    are ``<index>_<stem>.png`` for a file of one example, ``<index>_<stem>_<row>.png`` for each row of another."""
    torch.manual_seed(0)
    first, second = _digit_pngs(tmp_path / "in", 2)
    np.save(tmp_path / "in" / "rows.npy", np.random.default_rng(0).random((3, 1, 6, 6)))
    predictor = Predictor(conv_net(), preprocess=PreprocessSpec(input_shape=(1, 6, 6), dtype="float64"))
    inputs = [first, tmp_path / "in" / "rows.npy", second]
    written = explain_to_files(predictor, inputs, tmp_path / "maps")
    expected = ["000_digit0.png", "001_rows_0.png", "002_rows_1.png", "003_rows_2.png", "004_digit1.png"]
    assert [p.name for p in written] == expected
    explain_to_files(predictor, [second], tmp_path / "alone")
    assert (tmp_path / "alone" / "000_digit1.png").read_bytes() == written[4].read_bytes()  # the same example


def test_explanation_titles_name_a_regression_models_output_not_a_class(tmp_path, monkeypatch) -> None:
    """A regressor's PNG was titled ``integrated_gradients: class 0 (score ...)``."""
    from trainfer.analysis import attribution_plots

    titles: list[str] = []
    title = attribution_plots._title
    monkeypatch.setattr(attribution_plots, "_title", lambda *args: titles.append(title(*args)) or titles[-1])
    images = _digit_pngs(tmp_path / "in", 1)
    spec = PreprocessSpec(input_shape=(1, 6, 6), dtype="float64")
    explain_to_files(Predictor(conv_net(), preprocess=spec), images, tmp_path / "classes")
    regressor = Predictor(nn.Sequential(conv_net(), nn.Linear(4, 1).double()), task="regression", preprocess=spec)
    explain_to_files(regressor, images, tmp_path / "values")
    assert re.fullmatch(r"integrated_gradients: class [0-3] \(score .*\)", titles[0]), titles
    assert titles[1].startswith("integrated_gradients: output 0 (score "), titles


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.a(x), "b": self.b(x)}


def test_explain_refuses_predictors_it_cannot_differentiate_or_choose_for() -> None:
    spec = PreprocessSpec(input_shape=(3,))
    callable_model = Predictor(lambda batch: batch[:, :2], output_kind="logits", preprocess=spec)
    fix = r"serves a function: for a bundle, explain with Predictor.load\(path, float_form=True\)"
    with pytest.raises(TypeError, match=fix):
        explain(callable_model, [[1.0, 2.0, 3.0]])
    two_heads = Predictor(TwoHeads(), heads={"a": "classification", "b": "regression"}, preprocess=spec)
    with pytest.raises(ValueError, match="multi-head"):
        explain(two_heads, [[1.0, 2.0, 3.0]])


def _spy_on_explain_batch(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of examples of each explain_batch call explain_to_files and explain_each make, in order."""
    calls: list[int] = []

    def counted(predictor, batch, *args, **options):
        calls.append(len(batch))
        return explain_batch(predictor, batch, *args, **options)

    monkeypatch.setattr(attribution_files, "explain_batch", counted)
    return calls


def test_explain_each_explains_in_chunks_what_one_example_at_a_time_would(monkeypatch) -> None:
    """Per-example targets and baselines follow their examples into the chunks; float32 rounding apart,
    the attributions are those of each example explained alone."""
    torch.manual_seed(0)
    predictor = Predictor(digits_net().eval(), preprocess=PreprocessSpec(input_shape=(1, 8, 8)))
    batch = torch.rand(40, 1, 8, 8)
    targets, baselines = torch.randint(0, 10, (40,)), 0.1 * torch.rand(40, 1, 8, 8)
    calls = _spy_on_explain_batch(monkeypatch)
    explained = list(explain_each(predictor, batch, target=targets.tolist(), baselines=baselines))
    assert calls == [16, 16, 8] and [i for i, _, _ in explained] == list(range(40))
    for i, result, row in explained:
        alone = explain_batch(predictor, batch[i : i + 1], target=int(targets[i]), baselines=baselines[i : i + 1])
        assert int(result.target[row]) == int(targets[i])
        scale = float(alone.values.abs().max())
        torch.testing.assert_close(result.values[row], alone.values[0], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(result.scores[row], alone.scores[0], rtol=1e-5, atol=0)


def test_a_chunk_that_fails_is_explained_again_one_example_at_a_time(tmp_path, monkeypatch) -> None:
    """Examples 3 and 17 saturate: their chunks (0-15, 16-19) are explained again example by example, and
    exactly those two are skipped and named, as when every example was explained alone."""
    x = torch.tensor([[1.0, 0.0] if i in (3, 17) else [1e-6 * (i + 1), 0.0] for i in range(20)])
    calls = _spy_on_explain_batch(monkeypatch)
    with pytest.warns(ExplanationWarning) as warned, pytest.raises(ExplanationsIncomplete) as raised:
        explain_to_files(_two_class_linear(1e4), x, tmp_path)
    assert calls == [16, *[1] * 16, 4, *[1] * 4]
    assert [(i, name) for i, name, _ in raised.value.failed] == [(3, "003.png"), (17, "017.png")]
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{i:03d}.png" for i in range(20) if i not in (3, 17)]
    said = [str(w.message) for w in warned if w.category is ExplanationWarning]
    assert [line.split(":")[0] for line in said] == [
        "example 3 (003.png) not explained",
        "example 17 (017.png) not explained",
    ]
    assert "completeness check for example(s) [17]" in said[1]  # numbered as the whole run counts


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("sample", [(1, 6, 6), (3, 6, 6), (6, 6)])
def test_one_figure_redrawn_per_example_draws_what_a_new_figure_draws(tmp_path, sample) -> None:
    """The plotter of a run redraws one figure: example k's PNG is the one a new figure gives it alone
    (the grey scale, colour limits, colour bar and layout follow the example, nothing stays from the last)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36 * (sample[0] if len(sample) == 3 else 1), 3))
    predictor = Predictor(model, labels=["a", "b", "c"], preprocess=PreprocessSpec(input_shape=sample))
    scales = torch.tensor([1.0, 1e-3, 50.0]).reshape(3, *[1] * len(sample))  # colour bars of other widths
    inputs = torch.rand(3, *sample) * scales + scales
    inputs[0] = 0.5  # a constant input first: its grey scale spans no values, the next ones' do
    result = explain(predictor, inputs)
    plotter = AttributionPlotter(predictor.labels)
    for k in range(3):
        redrawn = _pixels(plotter.draw(result, k, tmp_path / f"redrawn{k}.png"))
        alone = _pixels(plot_attribution(result, k, tmp_path / f"alone{k}.png", labels=predictor.labels))
        assert redrawn.shape == (374, 770, 3) and np.array_equal(redrawn, alone)
        heat = redrawn[:, 385:700].astype(int)  # the right panel, without the colour bar
        reddish, bluish = heat[..., 0] - heat[..., 2] > 60, heat[..., 2] - heat[..., 0] > 60
        assert reddish.any() and bluish.any()  # attributions of both signs over the input


def test_bars_redrawn_per_table_row_draw_what_a_new_figure_draws(tmp_path) -> None:
    predictor = _table_predictor(nn.Linear(3, 2).double(), columns=("u", "v", "w"))
    result = explain(predictor, [[1.0, -2.0, 3.0], [-300.0, 0.5, 0.0]], method="occlusion")
    plotter = AttributionPlotter(columns=("u", "v", "w"))
    for k in range(2):
        redrawn = _pixels(plotter.draw(result, k, tmp_path / f"redrawn{k}.png"))
        alone = _pixels(plot_attribution(result, k, tmp_path / f"alone{k}.png", columns=("u", "v", "w")))
        assert redrawn.shape == (275, 770, 3) and np.array_equal(redrawn, alone)
        colours = {tuple(pixel) for pixel in redrawn.reshape(-1, 3).tolist()}
        signs = {value > 0 for value in result.values[k].tolist() if value != 0}
        assert ((214, 39, 40) in colours, (31, 119, 180) in colours) == (True in signs, False in signs)
