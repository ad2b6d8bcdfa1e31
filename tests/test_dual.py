import inspect

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainfer
from trainfer.modes.dual import DualModule, TrainOnly, infer_path, train_only
from trainfer.testing import assert_close


class MultiTask(DualModule):
    """Three heads trained, one served."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classify = nn.Linear(4, 5)
        self.depth = nn.Conv2d(4, 1, 1)
        self.edges = nn.Conv2d(4, 1, 1)

    def forward_train(self, x, scale: float = 1.0):
        features = self.trunk(x) * scale
        return {
            "classes": self.classify(self.pool(features).flatten(1)),
            "depth": self.depth(features),
            "edges": self.edges(features),
        }

    def forward_infer(self, x, scale: float = 1.0):
        return self.classify(self.pool(self.trunk(x) * scale).flatten(1))


class WithAuxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 4)
        self.aux = train_only(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        features = self.body(x)
        aux = self.aux(features)
        out = self.head(features)
        return out if aux is None else (out, aux)


class Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 2)

    def forward_eval(self, x):
        return self.main(x)

    @infer_path(forward_eval)
    def forward(self, x):
        """Both heads."""
        return self.main(x), self.aux(x)

    @infer_path("head_eval")
    def head(self, x, bias=0.0):
        """Training head, with noise."""
        return self.main(x) + bias + 1.0

    def head_eval(self, x, bias=0.0):
        return self.main(x) + bias


def call_targets(graph_module: torch.fx.GraphModule) -> set[str]:
    return {node.target for node in graph_module.graph.nodes if node.op == "call_module"}


def test_dual_module_dispatches_on_mode_with_same_arguments():
    torch.manual_seed(0)
    model = MultiTask()
    x = torch.randn(2, 3, 6, 6)
    train_out = model.train()(x, scale=2.0)
    assert set(train_out) == {"classes", "depth", "edges"}
    assert train_out["depth"].shape == (2, 1, 6, 6)
    model.eval()
    infer_out = model(x, scale=2.0)
    assert isinstance(infer_out, torch.Tensor) and infer_out.shape == (2, 5)
    assert_close(infer_out, model.forward_infer(x, 2.0))


def test_dual_module_signature_is_the_inference_paths():
    assert list(inspect.signature(MultiTask.forward).parameters) == ["self", "x", "scale"]
    assert MultiTask.forward.__qualname__ == "MultiTask.forward"
    assert "forward_train" in (MultiTask.forward.__doc__ or "")


def test_dual_module_traces_only_inference_path_in_eval():
    torch.manual_seed(0)
    model = MultiTask().eval()
    traced = torch.fx.symbolic_trace(model)
    assert "depth" not in call_targets(traced) and "edges" not in call_targets(traced)
    assert not hasattr(traced, "depth") and not hasattr(traced, "edges")
    x = torch.randn(3, 3, 5, 5)
    assert_close(traced(x), model(x))
    traced_train = torch.fx.symbolic_trace(MultiTask().train())
    assert {"depth", "edges"} <= call_targets(traced_train)


def test_dual_module_without_paths_names_the_missing_method():
    class Half(DualModule):
        def forward_train(self, x):
            return x

    half = Half()
    assert half(torch.ones(1)).item() == 1.0
    with pytest.raises(NotImplementedError, match="Half must define forward_infer"):
        half.eval()(torch.ones(1))


def test_subclass_of_dual_module_uses_its_own_paths():
    class Doubled(MultiTask):
        def forward_infer(self, x, scale: float = 1.0):
            return 2 * super().forward_infer(x, scale)

    torch.manual_seed(0)
    model = Doubled().eval()
    x = torch.randn(1, 3, 5, 5)
    assert_close(model(x), 2 * MultiTask.forward_infer(model, x))


def test_train_only_runs_in_training_and_returns_none_in_eval():
    torch.manual_seed(0)
    model = WithAuxHead()
    x = torch.randn(4, 6)
    out, aux = model.train()(x)
    assert out.shape == (4, 2) and aux.shape == (4, 3)
    calls = []
    model.aux.module.register_forward_hook(lambda *args: calls.append(1))
    assert isinstance(model.eval()(x), torch.Tensor)
    assert calls == []
    assert isinstance(model.aux, TrainOnly)


def test_train_only_leaves_no_trace_in_eval_graph():
    torch.manual_seed(0)
    model = WithAuxHead().eval()
    traced = torch.fx.symbolic_trace(model)
    assert call_targets(traced) == {"body", "head"}
    assert not hasattr(traced, "aux")
    x = torch.randn(2, 6)
    assert_close(traced(x), model(x))
    assert "aux.module.0" in call_targets(torch.fx.symbolic_trace(WithAuxHead().train()))


def test_train_only_rejects_non_modules():
    with pytest.raises(TypeError, match="expects an nn.Module; got function"):
        train_only(lambda x: x)


def test_infer_path_on_forward_and_other_methods():
    torch.manual_seed(0)
    model = Decorated()
    x = torch.randn(2, 4)
    main, aux = model.train()(x)
    assert aux.shape == (2, 2)
    assert_close(model.head(x, bias=0.5), model.main(x) + 1.5)
    model.eval()
    assert_close(model(x), model.main(x))
    assert_close(model.head(x, bias=0.5), model.main(x) + 0.5)


def test_infer_path_preserves_name_docstring_and_signature():
    assert Decorated.forward.__name__ == "forward"
    assert Decorated.forward.__doc__ == "Both heads."
    assert Decorated.head.__doc__ == "Training head, with noise."
    assert list(inspect.signature(Decorated.head).parameters) == ["self", "x", "bias"]


def test_infer_path_traces_in_eval_mode():
    torch.manual_seed(0)
    model = Decorated().eval()
    traced = torch.fx.symbolic_trace(model)
    assert call_targets(traced) == {"main"}
    x = torch.randn(3, 4)
    assert_close(traced(x), model(x))


def test_infer_path_rejects_non_callables():
    with pytest.raises(TypeError, match="method or a method name; got int"):
        infer_path(3)


def test_public_names():
    assert trainfer.DualModule is DualModule
    assert trainfer.train_only is train_only
    assert trainfer.infer_path is infer_path


class ConvNetWithAux(DualModule):
    """Conv-BN trunk; training also runs a train_only head and a second head of its own."""

    def __init__(self, channels: int = 5, stride: int = 2, groups: int = 5, dilation: int = 1) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, channels, 3, stride=stride, padding=1), nn.BatchNorm2d(channels))
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, groups=groups),
            nn.BatchNorm2d(channels),
        )
        self.aux = train_only(nn.Sequential(nn.Conv2d(channels, 7, 1), nn.BatchNorm2d(7)))
        self.extra = nn.Conv2d(channels, 2, 1)

    def forward_train(self, x):
        features = self.trunk(x).relu()
        return {"main": self.conv(features), "aux": self.aux(features), "extra": self.extra(features)}

    def forward_infer(self, x):
        features = self.trunk(x).relu()
        self.aux(features)  # None in eval mode, and no node in the traced graph
        return self.conv(features)


@settings(max_examples=8)
@given(
    groups_channels=st.sampled_from([(1, 3), (1, 4), (5, 5), (3, 9), (2, 6)]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    size=st.integers(5, 10),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_deploy_drops_train_only_modules_and_the_training_path(groups_channels, stride, dilation, size, dtype):
    from trainfer.reparam.deploy import deploy
    from trainfer.testing import TOLERANCE, batch_norm_calls, randomize_batchnorm

    groups, channels = groups_channels
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvNetWithAux(channels, stride, groups, dilation)).to(dtype)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    deployed = deploy(model, x)
    names = {name for name, _ in deployed.named_modules()}
    assert not any(name.startswith(("aux", "extra")) for name in names)
    assert batch_norm_calls(deployed, x) == 0
    with trainfer.inference(model):
        reference = model(x)
    assert_close(deployed(x), reference, TOLERANCE[dtype])
    assert model.training and isinstance(model.aux, TrainOnly)  # the caller's model is untouched
