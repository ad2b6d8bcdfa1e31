"""trainfer.prune: dependency handling (residual, concat, depthwise, grouped, RepVGG blocks), the gate and
its search, fine-tuning hook, bundle round trip, pruned + int8 serving, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import trainfer
from trainfer.bench import count_macs, count_parameters
from trainfer.cli import main
from trainfer.errors import InputError, PruningError
from trainfer.models import digits_net

pytest.importorskip("torch_pruning")
OPEN = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)  # passes any candidate, deliberately


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


class Tangle(nn.Module):
    """A stem, a residual pair, a concat, a depthwise and a grouped conv, pool, linear: every coupling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.res = nn.Conv2d(16, 16, 3, padding=1)
        self.left, self.right = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.res(x)) + x  # not foldable: the residual pair stays two values
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)
        x = F.relu(self.grouped(F.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_dependencies_stay_consistent_residual_concat_depthwise_grouped():
    model = Tangle().eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = trainfer.prune(model, x, ratio=0.5, gate=OPEN)
    layers = convs(pruned)
    stem, res = layers["stem"], layers["res"]
    assert stem.out_channels == res.out_channels == res.in_channels < 16  # the residual pair pruned as one
    cat = layers["left"].out_channels + layers["right"].out_channels
    assert layers["dw"].in_channels == layers["dw"].groups == layers["dw"].out_channels == cat < 16
    grouped = layers["grouped"]
    assert grouped.groups == 4 and grouped.in_channels % 4 == 0 and grouped.out_channels % 4 == 0
    assert pruned.fc.out_features == 5 and pruned(torch.randn(3, 3, 8, 8)).shape == (3, 5)
    report = pruned.trainfer_prune_report
    assert report.macs[1] < 0.6 * report.macs[0] and report.parameters[1] < report.parameters[0]
    # counted as trainfer bench and the demo's report count them: one figure on every page
    assert report.macs == (count_macs(trainfer.deploy(model, x), x[:1]), count_macs(pruned, x[:1]))
    assert report.parameters == (count_parameters(model), count_parameters(pruned))


def test_repvgg_training_form_is_pruned_in_deploy_form_and_still_deploys_exactly():
    model = digits_net().eval()
    x = torch.randn(2, 1, 8, 8)
    pruned = trainfer.prune(model, x, ratio=0.5, round_to=8, gate=OPEN)
    widths = [m.out_channels for m in convs(pruned).values()]
    assert widths == [16, 16, 32, 32] and all(w % 8 == 0 for w in widths)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())  # its blocks are single convs
    again = trainfer.deploy(pruned, x)  # exact, verified
    assert trainfer.verify(pruned, again, x).ok


def test_gate_refuses_with_the_figures_and_the_report():
    model = digits_net().eval()
    strict = trainfer.AccuracyGate(min_agreement=1.0)
    with pytest.raises(PruningError, match="passes the gate") as caught:
        trainfer.prune(model, torch.randn(2, 1, 8, 8), ratio=0.7, data=torch.randn(32, 1, 8, 8), gate=strict,
                       search=False)  # fmt: skip
    assert not caught.value.report.gate.ok and caught.value.report.attempts


@pytest.mark.parametrize(
    ("finetune", "advice"),
    [(None, "fine-tune (finetune=...; CLI: --finetune-epochs)"), (lambda model: None, "fine-tune longer or otherwise")],
)
def test_a_refusal_advises_fine_tuning_as_it_was_or_was_not_run(finetune, advice):
    model, data = digits_net().eval(), torch.randn(16, 1, 8, 8)
    impossible = trainfer.AccuracyGate(min_agreement=1.0, max_rel_error=0.0)  # no pruned form matches exactly
    with pytest.raises(PruningError) as caught:
        trainfer.prune(model, data[:2], ratio=0.5, data=data, gate=impossible, finetune=finetune, search=False)
    assert advice in str(caught.value)
    assert ("--finetune-epochs)" in str(caught.value)) is (finetune is None)


@pytest.mark.parametrize(
    ("max_exempt", "why"),
    [
        (None, "with 2 of 4 layers exempt: the most the search allows (half the prunable layers"),
        (1, "with 1 of 4 layers exempt: the most max_exempt_layers=1 (CLI --max-exempt-layers) allows"),
    ],
)
def test_a_refusal_says_why_the_exemption_search_stopped(max_exempt, why):
    impossible = trainfer.AccuracyGate(min_agreement=1.0, max_rel_error=0.0)  # no pruned form matches exactly
    data = torch.randn(16, 1, 8, 8)
    with pytest.raises(PruningError) as caught:
        trainfer.prune(
            digits_net().eval(), data[:2], ratio=0.5, data=data, gate=impossible, max_exempt_layers=max_exempt
        )
    assert why in str(caught.value)


def test_search_exempts_the_most_sensitive_layers_until_the_gate_passes():
    model = digits_net().eval()
    strict = trainfer.AccuracyGate(min_agreement=1.0)
    data = torch.randn(32, 1, 8, 8)
    pruned = trainfer.prune(model, data[:2], ratio=0.7, data=data, gate=strict, max_exempt_layers=4)
    report = pruned.trainfer_prune_report
    ranked = [layer.name for layer in report.sensitivity]
    assert len(ranked) == 4 and report.gate.ok
    assert report.exempt == ranked[: len(report.exempt)] and report.exempt  # most damaging exempted first
    assert "most sensitive first" in str(report) and "agreement  drop pts" in str(report)  # apart, aligned


def test_finetune_hook_trains_the_pruned_form_before_the_gate():
    seen = []

    def finetune(model):
        seen.append((model.training, sum(p.numel() for p in model.parameters())))

    model = digits_net().eval()
    trainfer.prune(model, torch.randn(2, 1, 8, 8), ratio=0.5, gate=OPEN, finetune=finetune)
    full = sum(p.numel() for p in trainfer.deploy(model, torch.randn(2, 1, 8, 8)).parameters())
    assert len(seen) == 1 and seen[0][0] is True and seen[0][1] < full


@pytest.mark.parametrize("options", [{"ratio": 1.0}, {"ratio": -0.1}, {"round_to": 0}, {"importance": "taylor"},
                                     {"ratios": {"x": 2}}])  # fmt: skip
def test_options_are_checked(options):
    with pytest.raises(InputError):
        trainfer.prune(digits_net(), torch.randn(2, 1, 8, 8), **{"gate": OPEN, **options})


def test_bundle_round_trip_records_the_pruned_architecture_without_pickle(tmp_path):
    pruned = trainfer.prune(digits_net().eval(), torch.randn(2, 1, 8, 8), ratio=0.5, gate=OPEN)
    trainfer.save(pruned, tmp_path / "b", task="classification")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["form"] == "deploy" and manifest["architecture"] is not None
    assert manifest["deploy_options"]["pruned"]["ratio"] == 0.5
    loaded = trainfer.load(tmp_path / "b")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    assert [m.out_channels for m in convs(loaded).values()] == [16, 16, 32, 32]


def test_pruned_and_quantized_serving(tmp_path):
    pytest.importorskip("onnxruntime")
    data = torch.randn(64, 1, 8, 8)
    pruned = trainfer.prune(digits_net().eval(), data[:2], ratio=0.5, gate=OPEN)
    loose = trainfer.AccuracyGate(min_agreement=0.5)
    quantized = trainfer.quantize(pruned, data, gate=loose, equalize=False)
    quantized.save(tmp_path / "q", task="classification", labels=[str(i) for i in range(10)])
    predictor = trainfer.Predictor.load(tmp_path / "q")
    results = predictor.predict(data[:3], top_k=1)
    assert len(results) == 3


def test_cli_prune_writes_a_bundle_that_loads(tmp_path):
    deployed = trainfer.deploy(digits_net().eval(), torch.randn(2, 1, 8, 8))
    trainfer.save(deployed, tmp_path / "in", task="classification")
    result = CliRunner().invoke(
        main,
        [
            "prune",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "--ratio",
            "0.25",
            "--min-agreement",
            "0",
            "--max-accuracy-drop",
            "1",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "MACs per sample" in result.output
    loaded = trainfer.load(tmp_path / "out")
    assert [m.out_channels for m in convs(loaded).values()] == [24, 24, 48, 48]
    refused = CliRunner().invoke(
        main,
        [
            "prune",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "x"),
            "--ratio",
            "0.9",
            "--min-agreement",
            "1",
            "--no-search",
        ],  # fmt: skip
    )
    assert refused.exit_code == 2 and "passes the gate" in refused.output
