"""The folder's handler table: built-in entries, user registration, and the shared tracer policy."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.errors import InputTypeError
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.fold import (
    fold,
    fold_handlers,
    register_fold_handler,
    unregister_fold_handler,
)
from trainfer.reparam.fold.builtin import BUILTIN_HANDLERS
from trainfer.reparam.fold.trace import trace
from trainfer.testing import assert_close, randomize_batchnorm


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


def test_registration_makes_the_type_a_leaf_of_the_shared_trace_and_unregistering_undoes_it(registered):
    model, _ = model_and_input(torch.float32)
    assert [n.op for n in trace(model).graph.nodes].count("call_module") == 3
    unregister_fold_handler(UnfoldConv)
    assert [n.op for n in trace(model).graph.nodes].count("call_module") == 2
    assert UnfoldConv not in fold_handlers()


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
