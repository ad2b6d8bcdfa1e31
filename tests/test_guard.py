import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_modes import module_trees
from torch import nn

import trainfer
from trainfer.errors import ModeError, ModeWarning
from trainfer.modes.guard import guard


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(4, 2),
    )  # fmt: skip


X = torch.randn(4, 3, 6, 6)


def mode_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ModeWarning)]


def test_forgotten_eval_under_no_grad_warns_naming_the_modules():
    model = classifier()
    with guard(model), warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        model(X)
    (message,) = mode_warnings(record)
    assert "2 mode-dependent module(s) in training mode: 1 (BatchNorm2d), 5 (Dropout)" in message
    assert "trainfer.inference(model)" in message
    assert record[0].filename == __file__  # points at the caller, not at torch or trainfer


def test_inference_mode_is_caught_too_and_only_training_modules_are_named():
    model = classifier()
    model[1].eval()
    with guard(model), pytest.warns(ModeWarning, match=r"1 mode-dependent module\(s\) in training mode: 5 \(Dropout\)"):
        with torch.inference_mode():
            model(X)


def test_warning_is_emitted_once_per_model():
    first, second = classifier(), classifier()
    with guard(first), guard(second), warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            first(X)
            second(X)
    assert len(mode_warnings(record)) == 2


def test_strict_guard_raises_every_time():
    model = classifier()
    with guard(model, strict=True):
        for _ in range(2):
            with pytest.raises(ModeError, match=r"1 \(BatchNorm2d\), 5 \(Dropout\)"), torch.no_grad():
                model(X)


@pytest.mark.parametrize(
    "case",
    ["eval model under no_grad", "no mode-dependent modules", "grad-enabled training", "inside trainfer.inference"],
)
def test_no_false_alarms(case):
    model = classifier()
    if case == "eval model under no_grad":
        model.eval()
    if case == "no mode-dependent modules":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.0))
    with guard(model, strict=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        if case == "grad-enabled training":
            model(X).sum().backward()
        elif case == "inside trainfer.inference":
            with trainfer.inference(model):
                model(X)
        else:
            with torch.no_grad():
                model(X)


def test_remove_uninstalls_the_hook():
    model = classifier()
    handle = guard(model, strict=True)
    handle.remove()
    handle.remove()
    with torch.no_grad():
        model(X)
    assert not model._forward_pre_hooks


def test_batch_of_one_in_training_gets_a_clear_message():
    model = classifier()
    with guard(model), pytest.warns(ModeWarning, match=r"batch size 1 through BatchNorm .*: 1 \(BatchNorm2d\)"):
        model(X[:1])
    flat = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with guard(flat, strict=True), pytest.raises(ModeError, match="Train with batches of 2 or more"):
        flat(torch.randn(1, 3))  # torch itself would say "Expected more than 1 value per channel"
    with guard(flat, strict=True), pytest.raises(ModeError, match="batch size 1"):
        flat(input=torch.randn(1, 3))


def test_batch_of_one_without_training_batchnorm_is_fine():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).eval(), nn.Dropout(0.1))
    with guard(model, strict=True):
        model(torch.randn(1, 3))


def test_guard_rejects_non_modules():
    with pytest.raises(TypeError, match="guard expects a torch.nn.Module; got str"):
        guard("model")


def test_public_name():
    assert trainfer.guard is guard


def trains_something_mode_dependent(tree: nn.Module) -> bool:
    """Independent oracle for the trees drawn: a BatchNorm or a p>0 Dropout in training mode."""
    return any(isinstance(m, (nn.BatchNorm1d, nn.Dropout)) and m.training for m in tree.modules())


@settings(max_examples=30)
@given(tree=module_trees(), strict=st.booleans())
def test_guard_fires_exactly_when_a_mode_dependent_module_trains(tree, strict):
    fires = trains_something_mode_dependent(tree)
    with guard(tree, strict=strict), warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        with pytest.raises(ModeError) if strict and fires else contextlib.nullcontext():
            tree(torch.randn(4, 3))
    assert len(mode_warnings(record)) == int(fires and not strict)
