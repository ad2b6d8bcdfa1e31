"""The folder's handler table: built-in entries, user registration, and the shared tracer policy."""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import trainfer
from trainfer.errors import InputTypeError
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.fold import (
    FoldHandlers,
    NotLinear,
    fold,
    fold_handlers,
    register_fold_handler,
    unregister_fold_handler,
)
from trainfer.reparam.fold.builtin import BUILTIN_HANDLERS
from trainfer.reparam.fold.trace import trace
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm


class UnfoldConv(nn.Module):
    """A 3x3 conv (padding 1) computed as unfold + matmul: linear, but no handler recognises it."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        columns = F.unfold(x, 3, padding=1)  # (N, cin * 9, h * w)
        y = self.weight.flatten(1) @ columns + self.bias[:, None]
        return y.reshape(n, -1, h, w)


def unfold_conv_handler(context, node):
    module = context.module(node)
    op = ConvOp.from_call(module.weight.detach(), module.bias.detach(), padding=1)
    return context.linear(node, node.args[0], op)


@pytest.fixture
def registered():
    register_fold_handler(UnfoldConv, unfold_conv_handler)
    yield
    unregister_fold_handler(UnfoldConv)


def model_and_input(dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(UnfoldConv(3, 4), nn.BatchNorm2d(4), nn.ReLU())
    randomize_batchnorm(model)
    return model.to(dtype).eval(), torch.randn(2, 3, 8, 8, dtype=dtype)


def test_without_a_handler_the_disguised_conv_is_traced_into_and_not_folded():
    model, x = model_and_input(torch.float64)
    gm, log = fold(copy.deepcopy(model), (x,))
    assert log.regions == []
    assert any(isinstance(m, _BatchNorm) for m in gm.modules())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_registered_module_handler_is_used_and_its_conv_absorbs_the_batch_norm(registered, dtype):
    model, x = model_and_input(dtype)
    gm, log = fold(copy.deepcopy(model), (x,))
    assert [region.members for region in log.regions] == [["0", "1"]]
    assert not any(isinstance(m, (_BatchNorm, UnfoldConv)) for m in gm.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 1
    with torch.no_grad():
        assert_close(gm(x), model(x))


def module_calls(model: nn.Module, handlers: FoldHandlers) -> int:
    return [n.op for n in trace(model, leaf_types=handlers.leaf_types).graph.nodes].count("call_module")


def test_registration_makes_the_type_a_leaf_of_the_default_table_and_unregistering_undoes_it(registered):
    model, _ = model_and_input(torch.float32)
    assert module_calls(model, FoldHandlers.default()) == 3
    unregister_fold_handler(UnfoldConv)
    assert module_calls(model, FoldHandlers.default()) == 2
    assert UnfoldConv not in fold_handlers()


def test_a_handler_passed_to_one_call_is_used_there_and_does_not_leak_into_another_call():
    model, x = model_and_input(torch.float64)
    deployed = trainfer.deploy(model, x, protocols=False, handlers={UnfoldConv: unfold_conv_handler})
    assert batch_norm_calls(deployed, x) == 0 and count_aten_ops(deployed, x)["convolution"] == 1
    with torch.no_grad():
        assert_close(deployed(x), model(x), 1e-9)
    assert UnfoldConv not in fold_handlers() and UnfoldConv not in FoldHandlers.default().leaf_types
    plain = trainfer.deploy(model, x, protocols=False)  # the next call: built-ins only, the BN stays
    assert batch_norm_calls(plain, x) == 1 and count_aten_ops(plain, x)["convolution"] == 0
    assert module_calls(model, FoldHandlers.default()) == 2  # nor is the type a leaf of the shared tracer
    report = trainfer.deploy_report(model, x, protocols=False, handlers={UnfoldConv: unfold_conv_handler})
    assert [region.members for region in report.regions] == [["0", "1"]]


def test_a_per_call_handler_overrides_a_registered_one_for_that_call_only(registered):
    seen = []

    def declining(context, node):
        seen.append(node.name)
        raise NotLinear("declined by the per-call handler")

    model, x = model_and_input(torch.float64)
    _, log = fold(copy.deepcopy(model), (x,), handlers=FoldHandlers.default({UnfoldConv: declining}))
    assert seen and log.regions == [] and any("declined by the per-call handler" in item for item in log.kept)
    _, log = fold(copy.deepcopy(model), (x,))
    assert [region.members for region in log.regions] == [["0", "1"]]


def test_a_handler_declines_one_way_and_returning_none_is_a_clear_error():
    model, x = model_and_input(torch.float64)
    with pytest.raises(InputTypeError, match="raises NotLinear"):
        fold(copy.deepcopy(model), (x,), handlers=FoldHandlers.default({UnfoldConv: lambda context, node: None}))


def test_a_wrong_handler_is_named_as_the_suspect_of_its_regions_divergence():
    """Newcomer 7 #14: only a region's output is compared, so the divergence showed at the BatchNorm ('1')."""

    def flipped(context, node):  # linear, but not what the module computes
        module = context.module(node)
        op = ConvOp.from_call(module.weight.detach().flip(-1), module.bias.detach(), padding=1)
        return context.linear(node, node.args[0], op)

    model, x = model_and_input(torch.float32)
    with pytest.raises(trainfer.EquivalenceError) as caught:
        trainfer.deploy(model, x, protocols=False, handlers={UnfoldConv: flipped})
    assert caught.value.report.handled == ["0"]
    assert (
        "first divergence at module '1' (folded into fused with 0, where the error may start; "
        "0 folded by a custom fold handler: check the expression it returns)"
    ) in str(caught.value)


def test_the_handler_context_is_read_only():
    contexts = []

    def spy(context, node):
        contexts.append(context)
        return unfold_conv_handler(context, node)

    model, x = model_and_input(torch.float64)
    fold(copy.deepcopy(model), (x,), handlers=FoldHandlers.default({UnfoldConv: spy}))
    (context,) = contexts
    with pytest.raises(dataclasses.FrozenInstanceError):
        context._state = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.graph.handlers = None
    with pytest.raises(TypeError):
        context.graph.modules["0"] = nn.Identity()  # the graph's module table is a read-only view


def test_a_registered_function_handler_replaces_the_built_in_one_until_unregistered():
    seen = []

    def spy(context, node):
        seen.append(node.name)
        return BUILTIN_HANDLERS[operator.add](context, node)

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x) + self.b(x)

    x = torch.randn(1, 2, 4, 4)
    register_fold_handler(operator.add, spy)
    try:
        _, log = fold(Branches().eval(), (x,))
    finally:
        unregister_fold_handler(operator.add)
    assert seen == ["add"] and len(log.regions) == 1
    assert fold_handlers()[operator.add] is BUILTIN_HANDLERS[operator.add]


def test_the_built_in_table_covers_every_op_the_folder_recognised_before():
    table = fold_handlers()
    modules = [nn.Conv2d, nn.Linear, _BatchNorm, nn.AvgPool2d, nn.ConstantPad2d]
    functions = [F.conv2d, F.linear, F.batch_norm, F.pad, F.avg_pool2d, operator.getitem]
    arithmetic = [operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub]
    arithmetic += [operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div]
    methods = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", operator.neg, torch.neg]
    assert [t for t in modules + functions + arithmetic + methods if t not in table] == []


def test_a_target_that_is_not_a_call_target_or_a_handler_that_is_not_callable_is_refused():
    with pytest.raises(InputTypeError):
        register_fold_handler(3, unfold_conv_handler)
    with pytest.raises(InputTypeError):
        register_fold_handler(UnfoldConv, "not a handler")
    assert UnfoldConv not in fold_handlers()


def test_trace_sees_through_batch_norm_subclasses_and_leaves_them_as_they_were():
    class ActBN(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(2, 2, 1), ActBN(2)).eval()
    graph = trace(model).graph
    assert any(n.target is F.batch_norm for n in graph.nodes)
    assert "_check_input_dim" not in vars(model[1])


class GatedSequential(nn.Sequential):
    """A Sequential whose own forward cannot be traced: its members are folded pair by pair."""

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = layer(x) if x.mean() > -100 else x  # data-dependent control flow
        return x


def test_a_sequential_pair_is_recognised_through_the_same_table_as_a_graph():
    model, x = model_and_input(torch.float64)
    gated = GatedSequential(*model)
    _, log = fold(copy.deepcopy(gated), (x,))
    assert log.regions == []  # no handler for UnfoldConv: the pair is not linear
    folded, log = fold(copy.deepcopy(gated), (x,), handlers=FoldHandlers.default({UnfoldConv: unfold_conv_handler}))
    assert [(region.name, region.members) for region in log.regions] == [("0", ["0", "1"])]
    assert batch_norm_calls(folded, x) == 0 and count_aten_ops(folded, x)["convolution"] == 1
    with torch.no_grad():
        assert_close(folded(x), gated(x), 1e-9)
