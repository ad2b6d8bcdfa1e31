"""Output kinds: detection from the traced eval graph, selection among several outputs, sanity checks."""

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainfer.serve.outputs import (
    check_output_kind,
    describe_structure,
    detect_output_kind,
    flatten_outputs,
    resolve_heads,
    select_output,
    to_scores,
)

Pair = namedtuple("Pair", "act pre")


class Final(nn.Module):
    """A linear layer followed by ``final`` (a callable on the logits), optionally through a reshape."""

    def __init__(self, final, classes: int = 3, reshape: bool = False):
        super().__init__()
        self.linear = nn.Linear(4, classes)
        self.final = final
        self.reshape = reshape

    def forward(self, x):
        z = self.final(self.linear(x))
        return z.flatten(1).view(x.shape[0], -1) if self.reshape else z


CASES = [
    (nn.Softmax(dim=1), "probabilities", "Softmax module"),
    (lambda z: F.softmax(z, dim=1), "probabilities", "functional.softmax"),
    (lambda z: torch.softmax(z, 1), "probabilities", "softmax"),
    (lambda z: z.softmax(1), "probabilities", "Tensor.softmax"),
    (nn.LogSoftmax(dim=1), "log_probabilities", "LogSoftmax module"),
    (lambda z: F.log_softmax(z, dim=1), "log_probabilities", "log_softmax"),
    (lambda z: torch.log_softmax(z, 1), "log_probabilities", "log_softmax"),
    (lambda z: z.log_softmax(1), "log_probabilities", "Tensor.log_softmax"),
    (nn.Sigmoid(), "probabilities", "Sigmoid module"),
    (torch.sigmoid, "probabilities", "sigmoid"),
    (F.sigmoid, "probabilities", "sigmoid"),
    (lambda z: z.sigmoid(), "probabilities", "Tensor.sigmoid"),
    (nn.Identity(), "logits", "Linear module 'linear' is not"),
    (torch.relu, "logits", "relu is not"),
]


@pytest.mark.parametrize(("final", "kind", "how"), CASES)
@pytest.mark.parametrize("reshape", [False, True])
def test_every_final_op_is_detected(final, kind, how, reshape):
    model = Final(final, reshape=reshape).eval()
    decision = detect_output_kind(model)
    assert decision.kind == kind
    assert how in decision.decided_by and "traced eval graph" in decision.decided_by


def test_sequential_binary_head_through_flatten():
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid(), nn.Flatten(0)).eval()
    assert detect_output_kind(model).kind == "probabilities"


class Untraceable(nn.Module):
    def __init__(self, final):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.final = final

    def forward(self, x):
        z = self.linear(x)
        if z.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            z = z * 2
        return {"main": self.final(z), "raw": z}


@pytest.mark.parametrize(
    ("final", "kind"),
    [
        (nn.LogSoftmax(1), "log_probabilities"),
        (lambda z: F.log_softmax(z, 1), "log_probabilities"),
        (lambda z: torch.softmax(z, 1).flatten(1), "probabilities"),
        (lambda z: torch.sigmoid(z)[:, 0], "probabilities"),
        (torch.tanh, "logits"),
    ],
)
def test_untraceable_models_are_read_from_the_executed_ops(final, kind):
    model = Untraceable(final).eval()
    decision = detect_output_kind(model, "main", torch.randn(2, 4))
    assert (
        decision.kind == kind and "executed op aten." in decision.decided_by and "tracing failed" in decision.decided_by
    )
    assert detect_output_kind(model, "raw", torch.randn(2, 4)).kind == "logits"
    without_inputs = detect_output_kind(model, "main")
    assert without_inputs.kind == "logits" and "no example inputs" in without_inputs.decided_by


class Structured(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        z = self.linear(x)
        if self.kind == "tuple":
            return torch.sigmoid(z), z
        if self.kind == "named":
            return Pair(torch.sigmoid(z), z)
        return {"probs": z.softmax(1), "logits": z, "log": F.log_softmax(z, 1)}


@pytest.mark.parametrize(
    ("structure", "which", "kind"),
    [
        ("tuple", None, "probabilities"),
        ("tuple", 0, "probabilities"),
        ("tuple", 1, "logits"),
        ("named", "act", "probabilities"),
        ("named", "pre", "logits"),
        ("named", 1, "logits"),
        ("dict", None, "probabilities"),
        ("dict", "logits", "logits"),
        ("dict", "log", "log_probabilities"),
    ],
)
def test_detection_per_selected_output(structure, which, kind):
    model = Structured(structure).eval()
    assert detect_output_kind(model, which).kind == kind
    output = model(torch.randn(2, 4))
    selected = select_output(output, which)
    assert selected.shape == (2, 3)


def test_select_output_errors_name_the_choices():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"not among the model's outputs \['a', 'b'\]"):
        select_output({"a": z, "b": z}, "c")
    with pytest.raises(ValueError, match="out of range: the model returns 2 outputs"):
        select_output((z, z), 2)
    with pytest.raises(ValueError, match="returns one tensor"):
        select_output(z, 1)
    with pytest.raises(ValueError, match="fields"):
        select_output(Pair(z, z), "nope")
    with pytest.raises(ValueError, match="expected a tensor"):
        select_output((None, z), 0)


def test_structure_description_and_flattening():
    z = torch.zeros(1)
    assert describe_structure(z) == {"type": "tensor"}
    assert describe_structure({"b": z, "a": z}) == {"type": "dict", "keys": ["b", "a"]}
    assert describe_structure((z, z)) == {"type": "tuple", "length": 2}
    assert describe_structure(Pair(z, z)) == {"type": "tuple", "length": 2, "fields": ["act", "pre"]}
    assert flatten_outputs({"b": z, "a": z})[0] == ["b", "a"]
    assert flatten_outputs((z, z))[0] == ["output_0", "output_1"]
    assert flatten_outputs(z)[0] == ["output"]


@settings(max_examples=40)
@given(batch=st.integers(1, 6), classes=st.integers(2, 7), seed=st.integers(0, 1000))
def test_scores_are_the_same_probabilities_whatever_the_kind(batch, classes, seed):
    z = torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    reference = torch.softmax(z, 1)
    for values, kind in [(z, "logits"), (reference, "probabilities"), (torch.log_softmax(z, 1), "log_probabilities")]:
        torch.testing.assert_close(to_scores(values, kind, "classification"), reference, rtol=0, atol=1e-12)
        assert check_output_kind(values, kind, "classification") is None
    binary = torch.sigmoid(z[:, 0])
    for values, kind in [(z[:, :1], "logits"), (binary, "probabilities"), (F.logsigmoid(z[:, 0]), "log_probabilities")]:
        torch.testing.assert_close(to_scores(values, kind, "binary"), binary, rtol=0, atol=1e-12)
    two = torch.stack([-z[:, 0], z[:, 0]], 1) / 2  # softmax of (-a/2, a/2) is sigmoid(a) for class 1
    torch.testing.assert_close(to_scores(two, "logits", "binary"), binary, rtol=0, atol=1e-12)
    assert torch.equal(to_scores(z, "logits", "regression"), z)


def test_sanity_check_names_the_contradiction():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    assert "not [0, 1]" in check_output_kind(z, "probabilities", "classification")
    assert "rows sum to" in check_output_kind(torch.tensor([[0.2, 0.2, 0.2]]), "probabilities", "classification")
    assert "> 0" in check_output_kind(z, "log_probabilities", "classification")
    assert "softmax would be applied twice" in check_output_kind(z.softmax(1), "logits", "classification")
    assert check_output_kind(z, "logits", "classification") is None
    assert check_output_kind(z, "probabilities", "regression") is None


@pytest.mark.parametrize("task", ["classification", "sequence"])
def test_logits_that_already_are_normalised_rows_contradict_their_declaration(task):
    """Along the class axis (the last of (N, C) and of a CTC head's (N, T, C)): "logits" that are
    probabilities or log-probabilities, and "(log-)probabilities" whose rows do not sum to 1, are named."""
    z = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    z = z[:, 0] if task == "classification" else z
    log_probs = z.log_softmax(-1)
    assert "look like log-probabilities" in check_output_kind(log_probs, "logits", task)
    assert "softmax would be applied twice" in check_output_kind(log_probs.exp(), "logits", task)
    assert "rows sum to" in check_output_kind(z.sigmoid(), "probabilities", task)
    assert "exp(rows) sum to" in check_output_kind(-z.abs(), "log_probabilities", task)
    for values, kind in [(z, "logits"), (log_probs.exp(), "probabilities"), (log_probs, "log_probabilities")]:
        assert check_output_kind(values, kind, task) is None


def test_resolve_heads_declared_detected_and_regression():
    model = Structured("dict").eval()
    heads = resolve_heads(model, heads={"probs": "classification", "logits": "regression"}, labels={"probs": "abc"})
    assert [h.name for h in heads] == ["probs", "logits"]
    assert heads[0].kind.kind == "probabilities" and heads[0].labels == ("a", "b", "c")
    assert heads[1].kind is None
    declared = resolve_heads(model, output="logits", output_kind="probabilities")[0]
    assert declared.kind.kind == "probabilities" and declared.kind.decided_by == "declared by the caller"
    with pytest.raises(ValueError, match="output_kind must be one of"):
        resolve_heads(model, output_kind="softmax")
    with pytest.raises(ValueError, match="task must be one of"):
        resolve_heads(model, task="ranking")
