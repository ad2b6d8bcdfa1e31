"""``trainfer.deploy`` / ``deploy_report``: the whole pipeline, its guarantees and its report."""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainfer
from trainfer.blocks import ACBlock, DiverseBranchBlock, MobileOneBlock, RepVGGBlock
from trainfer.models import digits_net, mobileone_s0, reparameterize, repvgg_a0
from trainfer.reparam import algebra
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.point = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dense(x) + self.point(x))


class Net(nn.Module):
    """Two blocks, a dropout, a classifier and a training-only auxiliary head; tuple output."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Block(3, 6, 2), Block(6, 6))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 4)
        self.aux = nn.Linear(6, 4)

    def forward(self, x):
        pooled = self.features(x).mean((2, 3))
        logits = self.fc(self.drop(pooled))
        if self.training:
            return logits, self.aux(pooled)
        return logits, pooled


def net() -> Net:
    torch.manual_seed(0)
    return randomize_batchnorm(Net())


X = torch.randn(2, 3, 8, 8)


def test_deploy_folds_verifies_and_reports():
    model = net()
    deployed = trainfer.deploy(model, X)
    assert count_aten_ops(deployed, X)["convolution"] == 2 and batch_norm_calls(deployed, X) == 0
    expected = model.eval()(X)
    for a, e in zip(deployed(X), expected, strict=True):
        assert_close(a, e)
    report = deployed.trainfer_report
    assert report.ok and set(report.verification) == {"float64", "float32"}
    assert report.verification["float64"].max_rel_error <= 1e-9
    assert report.before.batch_norms == 4 and report.after.batch_norms == 0
    assert report.after.parameters < report.before.parameters
    assert any(item.startswith("aux: ") for item in report.removed), report.removed
    assert any(item.startswith("drop (Dropout)") for item in report.removed), report.removed
    assert not any(key.startswith(("aux", "drop")) for key in deployed.state_dict())
    text = str(report)
    for fragment in ("regions folded", "features.0.dense.0", "batch_norms", "verification (float64)", "removed"):
        assert fragment in text


def test_deploy_never_touches_the_callers_model():
    model = net().train()
    model.features[1].eval()  # mixed modes must survive as they are
    calls = []
    model.fc.register_forward_hook(lambda *args: calls.append("forward"))
    model.features.register_forward_pre_hook(lambda *args: calls.append("pre"))
    state = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    deployed = trainfer.deploy(model, X)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()} == hooks
    assert calls == [], "deploy must not run the caller's hooks"
    assert deployed.trainfer_report.hooks_not_carried == 2
    assert model.aux.weight.requires_grad and model.features[0].dense[1].num_batches_tracked.item() == 100


def test_inplace_deploy_may_reuse_the_model():
    model = net().train()
    deployed = trainfer.deploy(model, X, inplace=True)
    assert not model.training and batch_norm_calls(deployed, X) == 0


def test_broken_fold_raises_equivalence_error_naming_the_region(monkeypatch):
    original = algebra.channel_affine

    def off_by_a_bit(op, scale, shift=None):
        result = original(op, scale, shift)
        return algebra.ConvOp(result.weight, result.bias + 0.01, result.stride, result.padding, result.dilation,
                              result.groups)  # fmt: skip

    monkeypatch.setattr(algebra, "channel_affine", off_by_a_bit)
    with pytest.raises(trainfer.EquivalenceError, match=r"first divergence at module 'features\.0\.") as caught:
        trainfer.deploy(net(), X)
    assert "from the folded region features.0.fused" in str(caught.value)
    assert isinstance(caught.value.report, trainfer.DeployReport) and not caught.value.report.ok
    plain = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.raises(
        trainfer.EquivalenceError,
        match=r"first divergence at module '1' \(folded into fused with 0, where the error may start\)",
    ):
        trainfer.deploy(plain, X)
    report = trainfer.deploy_report(net(), X)  # the same failure, reported instead of raised
    assert not report.ok and "FAIL" in str(report)


def test_explain_is_the_old_name_of_deploy_report_with_a_warning():
    """``Predictor.explain`` gives attributions; ``trainfer.explain`` meant the deploy report."""
    with pytest.warns(DeprecationWarning, match="trainfer.explain is now trainfer.deploy_report"):
        assert trainfer.explain is trainfer.deploy_report
    assert "explain" not in trainfer.__all__
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        trainfer.no_such_name  # noqa: B018


def test_result_scripts_and_exports_with_tuple_output():
    deployed = trainfer.deploy(net(), X)
    scripted = torch.jit.script(deployed)
    for a, e in zip(scripted(X), deployed(X), strict=True):
        assert_close(a, e)
    exported = torch.export.export(deployed, (X,)).module()
    for a, e in zip(exported(X), deployed(X), strict=True):
        assert_close(a, e)


def test_float64_model_is_verified_once_at_float64_tolerance():
    deployed = trainfer.deploy(net().double(), X.double())
    assert list(deployed.trainfer_report.verification) == ["float64"]
    assert next(deployed.parameters()).dtype == torch.float64


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="deploy expects an nn.Module; got str"):
        trainfer.deploy("model", X)
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        trainfer.deploy(net(), "pixels")
    with pytest.raises(ValueError, match=r"Net cannot run on the example inputs \(tensor\[2, 5, 8, 8\] float32\)"):
        trainfer.deploy(net(), torch.randn(2, 5, 8, 8))


# --- trainfer's own blocks and models ---------------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        lambda: RepVGGBlock(4, 4),
        lambda: RepVGGBlock(4, 6, stride=2, groups=2),
        lambda: ACBlock(5, 5, stride=2),
        lambda: DiverseBranchBlock(4, 6),
        lambda: DiverseBranchBlock(6, 6, stride=2, groups=3),
        lambda: MobileOneBlock(6, 6, groups=6),
    ],
)
def test_trainfer_blocks_fold_without_their_protocol(block):
    model = randomize_batchnorm(block())
    x = torch.randn(2, model.in_channels if hasattr(model, "in_channels") else 4, 8, 8)
    deployed = trainfer.deploy(model, x, protocols=False)
    reference = reparameterize(copy.deepcopy(model).eval())
    assert count_aten_ops(deployed, x)["convolution"] == count_aten_ops(reference, x)["convolution"] == 1
    assert batch_norm_calls(deployed, x) == 0
    assert sum(p.numel() for p in deployed.parameters()) <= sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("protocols", [False, True])
def test_digits_net_dual_module_and_train_only_head(protocols):
    model = randomize_batchnorm(digits_net())
    x = torch.randn(3, 1, 8, 8)
    deployed = trainfer.deploy(model, x, protocols=protocols)
    reference = reparameterize(copy.deepcopy(model).eval())
    assert count_aten_ops(deployed, x)["convolution"] == count_aten_ops(reference, x)["convolution"] == 4
    assert batch_norm_calls(deployed, x) == 0
    assert not any("aux_head" in key for key in deployed.state_dict())
    recipe = trainfer.recipe_of(model)
    assert trainfer.recipe_of(deployed) == replace(recipe, form="deploy", deploy_options={"protocols": protocols})
    assert trainfer.recipe_of(model).form == "train"


@pytest.mark.parametrize("factory", [repvgg_a0, mobileone_s0])
def test_model_zoo_matches_its_reparameterize(factory):
    model = randomize_batchnorm(factory(num_classes=5))
    x = torch.randn(1, 3, 32, 32)
    deployed = trainfer.deploy(model, x, protocols=False)
    reference = reparameterize(copy.deepcopy(model).eval())
    ours, theirs = count_aten_ops(deployed, x), count_aten_ops(reference, x)
    assert ours["convolution"] == theirs["convolution"] and batch_norm_calls(deployed, x) == 0
    assert sum(p.numel() for p in deployed.parameters()) <= sum(p.numel() for p in reference.parameters())
    assert sum(ours.values()) <= sum(theirs.values())


def test_protocol_conversion_then_folding_of_the_rest():
    class Stem(nn.Module):
        """A block with its own ``switch_to_deploy`` (mmpretrain convention) in a plain Conv-BN model."""

        def __init__(self):
            super().__init__()
            self.block = RepVGGBlock(3, 4)
            self.switched = False

        def switch_to_deploy(self):
            self.block.reparameterize()
            self.switched = True

        def forward(self, x):
            return self.block(x)

    model = randomize_batchnorm(nn.Sequential(Stem(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    deployed = trainfer.deploy(model, torch.randn(1, 3, 6, 6))
    report = deployed.trainfer_report
    assert report.protocols == ["0.switch_to_deploy()"] and not model[0].switched
    assert batch_norm_calls(deployed, torch.randn(1, 3, 6, 6)) == 0 and len(report.regions) == 1


def test_untraceable_model_falls_back_and_reports_it():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.b = Block(4, 4)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) if float(y.mean()) > -100 else y

    deployed = trainfer.deploy(randomize_batchnorm(Gate()), X)
    report = deployed.trainfer_report
    assert report.fallbacks and "not traceable" in str(report)
    assert batch_norm_calls(deployed, X) == 0


def test_functional_bn_after_functional_conv_never_survives():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = F.conv2d(x, self.weight, padding=1)
            return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)

    deployed = trainfer.deploy(randomize_batchnorm(Functional()), X)
    assert batch_norm_calls(deployed, X) == 0 and count_aten_ops(deployed, X)["convolution"] == 1


# --- command line -------------------------------------------------------------------------------------

FACTORY_SOURCE = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import user_models

    importlib.reload(user_models)
    return "user_models:make"


def run_cli(*args):
    from click.testing import CliRunner

    from trainfer.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_deploys_a_factory_with_weights_into_a_bundle(factory, tmp_path):
    import user_models
    from safetensors.torch import save_file

    trained = user_models.make()
    with torch.no_grad():
        trained[1].bias.fill_(0.7)
    save_file(trained.state_dict(), str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "bundle"
    result = run_cli("deploy", factory, "--weights", str(tmp_path / "ckpt.safetensors"),
                     "--input-shape", "1,3,8,8", "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "regions folded" in result.output and "verification (float64)" in result.output
    trainfer.register_model(user_models.make)  # the bundle names user_models:make: allow it
    loaded = trainfer.load(out)
    x = torch.randn(2, 3, 8, 8)
    assert_close(loaded(x), trained.eval()(x))
    assert batch_norm_calls(loaded, x) == 0


def test_cli_writes_bare_weights(factory, tmp_path):
    from safetensors.torch import load_file

    result = run_cli("deploy", factory, "--input-shape", "1,3,8,8", "-o", str(tmp_path / "w.safetensors"))
    assert result.exit_code == 0, result.output
    assert set(load_file(str(tmp_path / "w.safetensors"))) == {"fused.weight", "fused.bias", "4.weight", "4.bias"}


def test_cli_exit_codes_for_bad_input_and_equivalence_failure(factory, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    missing = run_cli("deploy", "no_such_module:make", "--input-shape", "1,3,8,8", "-o", out)
    assert missing.exit_code == 2 and "no_such_module" in missing.output
    wrong = run_cli("deploy", factory, "--input-shape", "1,5,8,8", "-o", out)
    assert wrong.exit_code == 2 and "cannot run on the example inputs (tensor[1, 5, 8, 8] float32)" in wrong.output
    original = algebra.channel_affine
    monkeypatch.setattr(algebra, "channel_affine", lambda op, s, t=None: original(op, s * 1.01, t))
    failed = run_cli("deploy", factory, "--input-shape", "1,3,8,8", "-o", out)
    assert failed.exit_code == 1 and "first divergence" in failed.output
    assert not (tmp_path / "out").exists(), "nothing is written when verification fails"


def test_bfloat16_model_is_folded_in_float64_and_rounded_once():
    model = net().to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    deployed = trainfer.deploy(model, x)
    assert next(deployed.parameters()).dtype == torch.bfloat16
    assert set(deployed.trainfer_report.verification) == {"float64", "bfloat16"}
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-9


def test_deploy_architecture_does_not_depend_on_the_statistics():
    """Bundles rebuild a deploy form from the factory with other BatchNorm statistics, then load weights."""
    trained, other = net(), randomize_batchnorm(net(), seed=7)
    a, b = trainfer.deploy(trained, X, verify=False), trainfer.deploy(other, X, verify=False)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    for got, expected in zip(b(X), trained.eval()(X), strict=True):
        assert_close(got, expected)


def test_infer_path_methods_resolve_to_the_inference_path():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
            self.main, self.aux = nn.Linear(36, 2), nn.Linear(36, 2)

        def head_infer(self, x):
            return self.main(x)

        @trainfer.infer_path(head_infer)
        def head(self, x):
            return self.main(x), self.aux(x)

        def forward(self, x):
            return self.head(self.body(x))

    x = torch.randn(2, 3, 5, 5)
    deployed = trainfer.deploy(randomize_batchnorm(Heads()), x)
    assert isinstance(deployed(x), torch.Tensor) and not any(k.startswith("aux") for k in deployed.state_dict())
    assert batch_norm_calls(deployed, x) == 0


BAD_TOLERANCES = [
    ("rtol", float("nan"), trainfer.InputError, "rtol must be a finite number > 0 or None; got nan"),
    ("rtol", float("inf"), trainfer.InputError, "rtol must be a finite number > 0 or None; got inf"),
    ("rtol", -1e-5, trainfer.InputError, "rtol must be a finite number > 0 or None; got -1e-05"),
    ("rtol", 0.0, trainfer.InputError, "rtol must be a finite number > 0 or None; got 0.0"),
    ("rtol", "1e-5", TypeError, "rtol must be a finite number > 0 or None; got str '1e-5'"),
    ("rtol", True, TypeError, "rtol must be a finite number > 0 or None; got bool True"),
    ("atol", float("nan"), trainfer.InputError, "atol must be a finite number >= 0 or None; got nan"),
    ("atol", -1.0, trainfer.InputError, "atol must be a finite number >= 0 or None; got -1.0"),
    ("atol", [0.1], TypeError, "atol must be a finite number >= 0 or None; got list [0.1]"),
]


@pytest.mark.parametrize("function", ["deploy", "verify"])
@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_TOLERANCES)
def test_a_tolerance_that_checks_nothing_is_refused_by_the_python_api(function, name, value, error, message):
    """NaN passes no comparison and inf every one: neither is a tolerance (nor a negative one, nor a string)."""
    model, x = net(), torch.randn(1, 3, 8, 8)
    call = trainfer.deploy if function == "deploy" else lambda m, x, **kw: trainfer.verify(m, m, x, **kw)
    with pytest.raises(error, match=re.escape(message)) as raised:
        call(model, x, **{name: value})
    assert isinstance(raised.value, trainfer.TrainferError)


def test_zero_absolute_and_numpy_tolerances_are_accepted():
    import numpy as np

    model, x = net(), torch.randn(1, 3, 8, 8)
    assert trainfer.verify(model, model, x, rtol=np.float32(1e-5), atol=0).ok
    assert trainfer.deploy(model, x, rtol=np.float64(1e-5), atol=0.0).trainfer_report.ok
