import contextlib
import functools
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainfer
from trainfer.modes.contexts import (
    _lock_of,
    inference,
    mode_dependent_modules,
    restore_modes,
    shared_inference,
    snapshot_modes,
    training,
)
from trainfer.modes.dual import DualModule, infer_path, train_only
from trainfer.testing import assert_close


def mixed_model() -> nn.Module:
    """A training model with a frozen BatchNorm kept in eval and an eval-mode branch."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.Dropout(0.3), nn.Conv2d(4, 2, 1))
    )
    model.train()
    model[1].eval()
    model[3][1].eval()
    return model


def modes_of(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


MIXED = [True, True, False, True, True, True, False]


def test_snapshot_and_restore_are_exact_per_module():
    model = mixed_model()
    snapshot = snapshot_modes(model)
    assert list(snapshot.values()) == MIXED and list(snapshot)[:2] == ["", "0"]
    model.eval()
    assert not any(modes_of(model))
    restore_modes(model, snapshot)
    assert modes_of(model) == MIXED


def test_restore_rejects_a_snapshot_of_another_structure():
    snapshot = snapshot_modes(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"not in snapshot \['1', '2', '3'.*not in model \[\]"):
        restore_modes(mixed_model(), snapshot)


def test_snapshot_rejects_non_modules():
    with pytest.raises(TypeError, match="expected a torch.nn.Module; got function"):
        snapshot_modes(lambda x: x)


def test_inference_sets_eval_and_inference_mode_then_restores_mixed_modes():
    model = mixed_model()
    with inference(model):
        assert not any(modes_of(model))
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert modes_of(model) == MIXED
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_inference_restores_on_exception():
    model = mixed_model()
    with pytest.raises(KeyError), inference(model):
        raise KeyError("boom")
    assert modes_of(model) == MIXED


def test_nested_contexts_restore_each_level():
    model = mixed_model()
    with inference(model):
        with training(model):
            assert all(modes_of(model))
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            with inference(model):
                assert not any(modes_of(model))
            assert all(modes_of(model))
        assert not any(modes_of(model)) and torch.is_inference_mode_enabled()
    assert modes_of(model) == MIXED


def test_several_models_at_once_and_the_same_model_twice():
    first, second = mixed_model(), nn.Sequential(nn.BatchNorm1d(3)).eval()
    with training(first, second, first):
        assert all(modes_of(first)) and all(modes_of(second))
    assert modes_of(first) == MIXED and modes_of(second) == [False, False]


def test_training_enables_gradients_inside_inference_mode():
    model = nn.Linear(3, 1).eval()
    with torch.inference_mode(), training(model):
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
    assert model.weight.grad is not None and not model.training


def test_decorator_use_restores_after_each_call():
    model = mixed_model()

    @trainfer.inference(model)
    def predict(x):
        assert not any(modes_of(model)) and torch.is_inference_mode_enabled()
        return model(x)

    x = torch.randn(2, 3, 5, 5)
    first = predict(x)
    assert modes_of(model) == MIXED
    assert_close(predict(x), first)
    assert modes_of(model) == MIXED


def test_contexts_reject_non_modules_before_changing_anything():
    model = mixed_model()
    with pytest.raises(TypeError, match="got int"), inference(model, 3):
        pass
    assert modes_of(model) == MIXED


@st.composite
def module_trees(draw, depth=2):
    leaves = [lambda: nn.BatchNorm1d(3), lambda: nn.Dropout(0.2), lambda: nn.Linear(3, 3), nn.ReLU]
    children = []
    for _ in range(draw(st.integers(1, 3))):
        if depth > 0 and draw(st.booleans()):
            children.append(draw(module_trees(depth=depth - 1)))
        else:
            children.append(draw(st.sampled_from(leaves))())
    tree = nn.Sequential(*children)
    for module in tree.modules():
        module.training = draw(st.booleans())
    return tree


@settings(max_examples=40)
@given(tree=module_trees(), raise_inside=st.booleans(), use_training=st.booleans())
def test_any_mode_pattern_survives_a_round_trip(tree, raise_inside, use_training):
    before = modes_of(tree)
    context = training if use_training else inference
    with pytest.raises(RuntimeError) if raise_inside else contextlib.nullcontext():
        with context(tree):
            assert all(modes_of(tree)) if use_training else not any(modes_of(tree))
            if raise_inside:
                raise RuntimeError
    assert modes_of(tree) == before


class ReadsTraining(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=self.training)


class ReadsTrainingInClosure(nn.Module):
    def forward(self, x):
        return (lambda: x * 2 if self.training else x)()


def training_helper(x):
    return x


class CallsAGlobalNamedTraining(nn.Module):
    def forward(self, x):
        return training_helper(x) if training is None else x


class Wrapped(nn.Module):
    @staticmethod
    def _wrap(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)

        return wrapper

    @_wrap
    def forward(self, x):
        return x * 2 if self.training else x


class HeadWithInferPath(nn.Module):
    def head_infer(self, x):
        return x

    @infer_path(head_infer)
    def head(self, x):
        return x * 2

    def forward(self, x):
        return self.head(x)


class Dual(DualModule):
    def forward_train(self, x):
        return x

    def forward_infer(self, x):
        return x


class MyBatchNorm(nn.BatchNorm2d):
    pass


def test_mode_dependent_modules_finds_every_kind():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        MyBatchNorm(4),
        nn.SyncBatchNorm(4),
        nn.InstanceNorm2d(4, track_running_stats=True),
        nn.AlphaDropout(0.1),
        nn.FeatureAlphaDropout(0.1),
        nn.Dropout1d(0.1),
        nn.Dropout2d(0.1),
        nn.Dropout3d(0.1),
        ReadsTraining(),
        ReadsTrainingInClosure(),
        Wrapped(),
        HeadWithInferPath(),
        Dual(),
        train_only(nn.Linear(2, 2)),
        nn.RReLU(),
    )
    found = {d.name: (d.kind, d.how) for d in mode_dependent_modules(model)}
    expected_kinds = ["batchnorm"] * 3 + ["dropout"] * 5 + ["reads_training"] * 4 + ["dual", "train_only"]
    expected_kinds += ["reads_training"]
    assert [kind for kind, _ in found.values()] == expected_kinds
    assert list(found) == [str(i) for i in range(1, 16)]
    assert found["12"][1] == "head() reads self.training"
    assert found["9"][1] == "forward() reads self.training"
    assert found["14"][1] == "training: runs Linear; eval: skipped, returns None"
    assert "p=0.1" in found["4"][1]


def test_mode_independent_modules_are_not_listed():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
        nn.ModuleList([nn.Linear(2, 2)]),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.InstanceNorm2d(4),
        nn.Dropout(0.0),
        nn.LayerNorm(4),
        CallsAGlobalNamedTraining(),
    )
    assert mode_dependent_modules(model) == []


def bn_dropout_classifier() -> nn.Module:
    """Class k of inputs shifts every pixel of channel 0 by +-1: BatchNorm in eval keeps it."""
    model = nn.Sequential(nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].running_var.fill_(1.0)
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[4].weight.copy_(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]))
        model[4].bias.zero_()
    return model.train()


def test_classic_failure_no_grad_without_eval_collapses_and_inference_fixes_it():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % 2
    images = torch.randn(16, 2, 4, 4, generator=generator) * 0.1
    images[:, 0] += (1 - 2 * labels).view(-1, 1, 1).float()
    model = bn_dropout_classifier()
    with torch.no_grad():  # the mistake: no_grad without eval()
        wrong = torch.cat([model(image[None]).softmax(1) for image in images])
    assert torch.allclose(wrong, torch.full_like(wrong, 0.5), atol=1e-3)  # every prediction collapses
    with trainfer.inference(model):
        right = torch.cat([model(image[None]).softmax(1) for image in images])
    assert torch.equal(right.argmax(1), labels)
    assert right.max(1).values.min() > 0.95
    assert model.training and model[0].training


def test_public_names():
    assert trainfer.inference is inference and trainfer.training is training
    assert trainfer.snapshot_modes is snapshot_modes and trainfer.restore_modes is restore_modes


@pytest.mark.parametrize("context", [inference, training])
def test_module_added_inside_then_an_exception_restores_the_rest_and_keeps_the_users_error(context):
    model = mixed_model()
    with pytest.raises(KeyError, match="the user's own error"), context(model):
        model.add_module("late", nn.Dropout(0.1))
        raise KeyError("the user's own error")
    assert modes_of(model)[: len(MIXED)] == MIXED  # every module that existed at entry is restored


def test_module_replaced_inside_restores_every_module_that_existed_at_entry():
    model = mixed_model()
    conv = model[0]
    with inference(model):
        model[0] = nn.Conv2d(3, 4, 3).eval()  # the old module leaves, a new one takes its name
    assert conv.training  # restored although no longer in the model
    assert not model[0].training  # the newcomer keeps the mode it was given
    modes = modes_of(model)
    assert modes[:1] + modes[2:] == MIXED[:1] + MIXED[2:]


@pytest.mark.parametrize("shared", [False, True])
def test_shared_inference_evaluates_a_model_whose_deepest_module_was_set_to_train_between_calls(shared):
    """Every module's own flag is read at each entry: one set directly (no ``.train()``) three levels
    down, also on a module reached by two paths, is switched to eval inside and given back after."""
    dropout = nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), dropout))).eval()
    if shared:
        model.add_module("again", model[1])
    x = torch.ones(1, 4)
    with shared_inference(model):
        expected = model(x)
    dropout.training = True
    with shared_inference(model):
        assert torch.is_inference_mode_enabled() and not any(module.training for module in model.modules())
        assert torch.equal(model(x), expected)
    assert dropout.training and not any(module.training for module in model.modules() if module is not dropout)


@pytest.mark.parametrize("trains", [False, True])
def test_shared_inference_holds_the_models_lock_only_while_it_switches_and_frees_it_after_an_error(trains):
    model = mixed_model() if trains else mixed_model().eval()
    before = modes_of(model)
    lock = _lock_of(model)

    def free_for_another_thread() -> bool:
        taken: list[bool] = []

        def try_lock() -> None:
            taken.append(lock.acquire(blocking=False))
            if taken[0]:
                lock.release()

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
        return taken[0]

    with pytest.raises(KeyError, match="inside"), shared_inference(model):
        assert free_for_another_thread() is not trains
        assert not any(modes_of(model)) and torch.is_inference_mode_enabled()
        raise KeyError("inside")
    assert modes_of(model) == before and not torch.is_inference_mode_enabled()
    assert free_for_another_thread()
