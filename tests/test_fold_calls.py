"""``calls.bind`` reads torch's own signatures: the defaults it fills in, passed explicitly, compute
what the call computed without them, for every call target the folder binds."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from trainfer.reparam.fold.calls import bind, parameters

X = torch.randn(2, 4, 7, 7, dtype=torch.float64)

# (target, the arguments a model passes; the rest are torch's defaults), for each target bound by the folder
CALLS = [
    (torch.conv2d, (X, torch.randn(3, 4, 3, 3, dtype=torch.float64))),
    (F.conv2d, (X, torch.randn(6, 2, 3, 3, dtype=torch.float64), None, 1, 1, 1, 2)),
    (F.linear, (X[:, :, 0, 0], torch.randn(5, 4, dtype=torch.float64))),
    (F.batch_norm, (X, torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)),
    (F.pad, (X, [1, 2, 0, 1])),
    (F.avg_pool2d, (X, 3)),
    (torch._C._nn.avg_pool2d, (X, (2, 3))),
    (F.dropout, (X,)),
    (F.dropout2d, (X,)),
    (F.alpha_dropout, (X,)),
]


def call_node(target, args) -> tuple[fx.GraphModule, fx.Node]:
    """A module whose forward calls ``target(x, *args[1:])``, traced, and the graph node of that call."""

    class Calls(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return target(x, *args[1:])

    gm = fx.symbolic_trace(Calls())
    return gm, next(node for node in gm.graph.nodes if node.op == "call_function")


def bound_values(target, args) -> dict:
    """``bind`` of the call, with the tensors the trace stored as attributes read back."""
    gm, node = call_node(target, args)
    return fx.node.map_arg(bind(node), lambda n: getattr(gm, str(n.target)) if n.op == "get_attr" else args[0])


@pytest.mark.parametrize(("target", "args"), CALLS, ids=lambda v: getattr(v, "__name__", ""))
def test_the_bound_defaults_passed_explicitly_compute_what_the_call_computed(target, args):
    bound = bound_values(target, args)
    assert list(bound)[: len(parameters(target))] == [name for name, _ in parameters(target)]
    torch.manual_seed(0)
    expected = target(*args)
    torch.manual_seed(0)
    assert torch.equal(target(**bound), expected)


def test_a_default_the_folder_reads_is_torchs():
    # the values the folder's decisions depend on (an eval-mode F.batch_norm; dropout that trains)
    assert bound_values(*CALLS[3])["training"] is False
    assert bound_values(*CALLS[7])["training"] is True
    assert bound_values(*CALLS[9])["training"] is False  # alpha_dropout's own default differs from dropout's


def test_a_target_without_a_signature_is_refused_clearly():
    with pytest.raises(TypeError, match="no signature"):
        parameters(object())
