"""The accuracy gate on binary (one logit) and regression outputs, and the refusal of a gate that compares nothing.

Newcomer 10 (F1, F2, F3): a one-logit binary model's "class agreement" was always 100 % and its 0/1 labels
were refused; a regressor's default gate compared nothing; a quantized regressor with no agreeing probe was
written and could not be loaded. The models here are small conv nets trained on ``load_digits`` ("is it a
7", and ink mass), with BatchNorm statistics from training.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import trainfer
from trainfer.cli import main
from trainfer.errors import BundleError, InputError, PruningError, QuantizationError
from trainfer.serve.gate import GateOutput, gate_report

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    """``load_digits`` pixels in [0, 1] as (N, 1, 8, 8), split 70/30, with the digit, "is 7" and the ink mass."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.7 * len(x))
    ink = x.sum((1, 2, 3))
    return {
        "train": x[:cut],
        "val": x[cut:],
        "is7": ((y[:cut] == 7).float(), (y[cut:] == 7).long()),
        "ink": (ink[:cut], ink[cut:]),
    }


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1),
    )  # fmt: skip


def _trained(x: torch.Tensor, target: torch.Tensor, loss: nn.Module, epochs: int = 60) -> nn.Module:
    torch.manual_seed(0)
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(128):
            optimizer.zero_grad()
            loss(model(x[batch])[:, 0], target[batch]).backward()
            optimizer.step()
    return trainfer.deploy(model.eval(), x[:2])


@pytest.fixture(scope="module")
def is7(digits, tmp_path_factory):
    """A one-logit binary bundle (BCEWithLogits): is the digit a 7?"""
    model = _trained(digits["train"], digits["is7"][0], nn.BCEWithLogitsLoss())
    path = tmp_path_factory.mktemp("is7") / "b"
    trainfer.save(model, path, task="binary", labels=["not 7", "7"], preprocess={"input_shape": list(SHAPE)})
    return path


@pytest.fixture(scope="module")
def ink(digits, tmp_path_factory):
    """A regression bundle: the ink mass (standardised for training, the scaling recorded in the bundle)."""
    target = digits["ink"][0]
    mean, std = float(target.mean()), float(target.std())
    model = _trained(digits["train"], (target - mean) / std, nn.MSELoss())
    path = tmp_path_factory.mktemp("ink") / "b"
    spec = {"input_shape": list(SHAPE), "target_mean": [mean], "target_std": [std]}
    trainfer.save(model, path, task="regression", preprocess=spec)
    return path


# --------------------------------------------------------------------------- binary (F1)
def test_a_binary_gate_compares_decisions_not_the_argmax_of_one_column():
    reference = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    flipped = torch.tensor([[2.0], [1.0], [-0.5], [-3.0]])  # two decisions flipped, small errors
    report = gate_report(reference, flipped, torch.tensor([1, 0, 1, 0]), output=GateOutput("binary", "logits"))
    assert report.agreement == 0.5 and report.reference_accuracy == 1.0 and report.candidate_accuracy == 0.5
    assert not report.ok and "decision agreement 50.00%" in str(report)
    probabilities = GateOutput("binary", "probabilities")
    assert gate_report(reference.sigmoid(), flipped.sigmoid(), output=probabilities).agreement == 0.5


def test_quantize_refuses_an_int8_binary_form_that_flips_decisions(is7, digits):
    badly_calibrated = digits["train"] * 0.05  # newcomer 10's badcal.npy: activation ranges far too small
    with pytest.raises(QuantizationError, match="decision agreement"):
        trainfer.quantize(is7, badly_calibrated, validation=digits["val"], labels=digits["is7"][1], max_float_layers=0)


def test_quantize_takes_0_1_labels_of_a_binary_model(is7, digits):
    result = trainfer.quantize(is7, digits["train"], validation=digits["val"], labels=digits["is7"][1].bool())
    gate = result.report.gate
    assert gate.task == "binary" and gate.reference_accuracy > 0.95 and gate.ok


def test_a_binary_gate_refuses_labels_other_than_0_and_1(is7, digits):
    with pytest.raises(InputError, match=r"class indices in 0\.\.1"):
        trainfer.quantize(is7, digits["train"], validation=digits["val"], labels=digits["is7"][1] * 2)


# --------------------------------------------------------------------------- regression (F2)
def test_pruning_that_ruins_a_regressor_is_refused_by_the_default_gate(ink, digits):
    with pytest.raises(PruningError, match="standard deviations of the reference outputs"):
        trainfer.prune(ink, ratio=0.75, data=digits["val"], search=False)


def test_a_regression_gate_with_targets_bounds_the_mae_increase(ink, digits):
    targets = digits["ink"][1]
    result = trainfer.quantize(ink, digits["train"], validation=digits["val"], labels=targets)
    gate = result.report.gate
    assert gate.task == "regression" and gate.agreement is None and gate.ok
    assert gate.reference_mae < 0.5 * float(targets.std())  # compared in target units, the scaling undone
    worse = dataclasses.replace(gate, candidate_mae=gate.reference_mae * 1.5)
    assert not worse.ok and "mean absolute error" in worse.failures()[0]


def test_the_rms_error_is_scaled_by_the_spread_not_the_magnitude():
    reference = 100 + torch.linspace(-1, 1, 50)[:, None]  # std 0.58 around 100
    shifted = reference + 0.1  # 0.1 % of the magnitude, 17 % of the spread
    report = gate_report(reference, shifted, output=GateOutput("regression"))
    assert report.max_rel_error < 0.002 and 0.15 < report.rms_error < 0.2 and not report.ok


# --------------------------------------------------------------------------- a gate that compares nothing
@pytest.mark.parametrize(
    ("output", "columns", "gate", "fragment"),
    [
        (GateOutput("classification"), 3, trainfer.AccuracyGate(min_agreement=None), "compares nothing"),
        (GateOutput("regression"), 1, trainfer.AccuracyGate(max_rms_error=None), "compares nothing"),
        (GateOutput("classification"), 1, trainfer.AccuracyGate(), "one column"),
        (GateOutput("binary"), 3, trainfer.AccuracyGate(), "one binary decision per sample"),
    ],
    ids=["classification-no-limits", "regression-no-limits", "one-column-classes", "multi-label"],
)
def test_a_gate_that_would_compare_nothing_is_refused(output, columns, gate, fragment):
    outputs = torch.randn(40, columns)
    with pytest.raises(InputError, match=fragment):
        gate_report(outputs, outputs, None, gate, output)


def test_prune_refuses_a_vacuous_gate_before_pruning(ink, digits):
    with pytest.raises(InputError, match=r"compares nothing on a regression output.*max_rms_error=math.inf"):
        trainfer.prune(ink, data=digits["val"], gate=trainfer.AccuracyGate(max_rms_error=None))


# --------------------------------------------------------------------------- an int8 form no load accepts (F3)
def test_quantize_refuses_an_int8_form_no_probe_agrees_with(ink, digits):
    """A gate loosened past what every load checks: the form is refused before anything is written."""
    loose = trainfer.AccuracyGate(max_rms_error=math.inf)
    with pytest.raises(QuantizationError, match="agrees with the float form on none of the"):
        trainfer.quantize(ink, digits["train"] * 0.05, validation=digits["val"], gate=loose, max_float_layers=0)


def test_loading_an_int8_bundle_without_probes_says_what_to_do(ink, digits, tmp_path):
    result = trainfer.quantize(ink, digits["train"], validation=digits["val"][:64])
    dataclasses.replace(result, probes=result.probes[:0]).save(tmp_path / "q")
    with pytest.raises(BundleError, match=r"holds no probe inputs.*runtime='torch'"):
        trainfer.Predictor.load(tmp_path / "q")
    assert trainfer.Predictor.load(tmp_path / "q", runtime="torch").predict(digits["val"][:1])  # the way out


# --------------------------------------------------------------------------- the CLI
def test_cli_quantize_takes_real_valued_targets_of_a_regressor(ink, digits, tmp_path):
    np.save(tmp_path / "cal.npy", digits["train"][:256].numpy())
    np.save(tmp_path / "val.npy", digits["val"].numpy())
    np.save(tmp_path / "ink.npy", digits["ink"][1].numpy())
    args = ["quantize", str(ink), "--calibration", str(tmp_path / "cal.npy"), "--validation", str(tmp_path / "val.npy")]
    result = CliRunner().invoke(main, [*args, "--labels", str(tmp_path / "ink.npy"), "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "MAE" in result.output and "output std" in result.output
    served = trainfer.Predictor.load(tmp_path / "q")  # its quantization.json records a regression verdict
    assert len(served.predict(digits["val"][:2])) == 2


def test_the_cli_gate_defaults_are_the_gates():
    from trainfer.cli.common import MAX_MAE_INCREASE, MAX_RMS_ERROR

    gate = trainfer.AccuracyGate()
    assert (gate.max_rms_error, gate.max_mae_increase) == (MAX_RMS_ERROR, MAX_MAE_INCREASE)


# --------------------------------------------------------------------------- gates per step (F6)
def test_quantize_against_a_reference_gates_the_loss_of_both_steps(is7, digits, tmp_path):
    """The int8 form of a pruned bundle passes against the pruned form, yet not against the original."""
    anything = trainfer.AccuracyGate(min_agreement=0.0)
    pruned = trainfer.prune(is7, ratio=0.75, data=digits["val"], gate=anything, search=False)
    trainfer.save(pruned, tmp_path / "pruned", task="binary", preprocess={"input_shape": list(SHAPE)})
    options = {"validation": digits["val"], "labels": digits["is7"][1], "gate": trainfer.AccuracyGate(0.95, 0.02)}
    alone = trainfer.quantize(tmp_path / "pruned", digits["train"], **options)
    assert alone.report.gate.ok and alone.report.settings["gate_reference"] == "the float form"
    with pytest.raises(QuantizationError, match="decision agreement"):
        trainfer.quantize(tmp_path / "pruned", digits["train"], reference=is7, max_float_layers=0, **options)


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.digit, self.size = nn.Conv2d(1, 8, 3), nn.Linear(8, 10), nn.Linear(8, 1)

    def forward(self, x):
        h = self.body(x).relu().mean((2, 3))
        return self.digit(h), self.size(h)


def test_prune_refuses_to_gate_a_model_with_several_outputs():
    """Its gate would compare the first output alone, whatever the other heads do."""
    with pytest.raises(InputError, match="compares one output tensor; this model returns a tuple"):
        trainfer.prune(_TwoOutputs().eval(), torch.randn(2, *SHAPE), ratio=0.5)
