"""``deploy`` and ``verify`` on the patterns of the big model sources (issue 23), in plain PyTorch.

Each test reproduces, without transformers/torchvision/ultralytics, one way those libraries write
models (children called by keyword, ``ModelOutput`` results, list inputs, decorated forwards,
``*args`` roots looping over an ``nn.Sequential``, caches in plain attributes, selections) and
checks the deployed form: exact (float64 1e-9, float32 1e-5 through ``deploy``'s own verification
and ``assert_close``), of the same output types, with every BatchNorm folded, and a report that
says why anything stayed.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from time_limit import time_limit
from torch import Tensor, nn
from torch.nn import functional as F

import trainfer
from trainfer.errors import EquivalenceError
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm

LIMIT_S = 60


def conv_bn(channels: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


def deployed(model: nn.Module, *example, **options):
    """``deploy`` of an eval copy with random BatchNorm statistics, within the time limit, and that copy."""
    reference = randomize_batchnorm(copy.deepcopy(model)).eval()
    with time_limit(LIMIT_S):
        result = trainfer.deploy(reference, *example, **options)
    return result, reference


# --- 5. verification that compares nothing ----------------------------------------------------------


class Thresholded(nn.Module):
    """``y[y > threshold]``: an output whose shape depends on the data."""

    def __init__(self, threshold: float, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.threshold = threshold

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y[y > self.threshold]


def test_verify_fails_when_an_output_is_empty_on_every_input_and_says_so():
    x = torch.randn(1, 3, 8, 8)
    eq = trainfer.verify(Thresholded(1e6, 0), Thresholded(1e6, 1), x)
    assert not eq.ok
    assert "empty on every" in str(eq)


def test_verify_with_allow_empty_passes_empty_outputs_explicitly():
    x = torch.randn(1, 3, 8, 8)
    eq = trainfer.verify(Thresholded(1e6, 0), Thresholded(1e6, 0), x, allow_empty=True)
    assert eq.ok


def test_verify_compares_data_dependent_outputs_where_they_hold_data():
    x = torch.randn(1, 3, 8, 8)
    assert trainfer.verify(Thresholded(0.0, 0), Thresholded(0.0, 0), x).ok
    assert not trainfer.verify(Thresholded(0.0, 0), Thresholded(0.0, 1), x).ok


def test_deploy_refuses_to_call_an_always_empty_output_verified_unless_told():
    model = nn.Sequential(conv_bn(), nn.Flatten(0))
    x = torch.randn(1, 4, 6, 6)

    class Empty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = self.body(x)
            return y, y[y > 1e6]

    with pytest.raises(EquivalenceError, match="empty on every"):
        deployed(Empty(), x, protocols=False)
    result, reference = deployed(Empty(), x, protocols=False, allow_empty=True)
    assert_close(result(x)[0], reference(x)[0])
    assert batch_norm_calls(result, x) == 0


# --- 4. output types --------------------------------------------------------------------------------


class ModelOutput(OrderedDict):
    """A minimal Hugging Face ``ModelOutput``: a dataclass whose non-``None`` fields are its keys."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            value = getattr(self, name)
            if value is not None:
                self[name] = value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)


@dataclass
class ClassifierOutput(ModelOutput):
    logits: Tensor | None = None
    hidden: Tensor | None = None


class Classifier(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body, self.head, self.kind = conv_bn(), nn.Linear(4, 3), kind

    def forward(self, x: Tensor):
        hidden = self.body(x)
        logits = self.head(hidden.mean((2, 3)))
        if self.kind == "ordered":
            return OrderedDict(out=logits, aux=hidden)
        return ClassifierOutput(logits=logits, hidden=hidden)


@pytest.mark.parametrize("kind", ["ordered", "model_output"])
def test_deploy_returns_the_models_own_mapping_type(kind):
    x = torch.randn(2, 4, 6, 6)
    result, reference = deployed(Classifier(kind), x, protocols=False)
    out, expected = result(x), reference(x)
    assert type(out) is type(expected)
    assert list(out.keys()) == list(expected.keys())
    if kind == "model_output":
        assert_close(out.logits, expected.logits)
    assert batch_norm_calls(result, x) == 0


def test_verify_compares_output_types_and_keys():
    class AsDict(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor):
            return dict(self.inner(x))

    reference = Classifier("ordered").eval()
    eq = trainfer.verify(reference, AsDict(reference), torch.randn(1, 4, 6, 6))
    assert not eq.ok
    assert "OrderedDict" in str(eq)


class KeyValueCache:
    """A plain object in an output (transformers' ``Cache``): no ``==`` of its own, tensors inside."""

    def __init__(self, keys: list[Tensor]) -> None:
        self.keys, self.length = keys, len(keys)


class Slotted:
    """An object verify cannot look into: ``__slots__``, identity ``==``."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value


class WithCache(nn.Module):
    def __init__(self, shift: float = 0.0, holder: type = KeyValueCache) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.shift, self.holder = conv_bn(), shift, holder

    def forward(self, x: Tensor):
        y = self.body(x)
        return y.mean((2, 3)), self.holder([y, y * 2 + self.shift] if self.holder is KeyValueCache else y)


def test_verify_compares_the_tensors_inside_a_plain_object_in_the_output():
    x = torch.randn(1, 4, 6, 6)
    reference = randomize_batchnorm(WithCache()).eval()
    same = copy.deepcopy(reference)
    eq = trainfer.verify(reference, same, x)
    assert eq.ok, eq
    paths = {e.path for e in eq.outputs}
    assert {"output[1].keys[0]", "output[1].keys[1]", "output[1].length"} <= paths
    shifted = copy.deepcopy(reference)
    shifted.shift = 1e-3
    eq = trainfer.verify(reference, shifted, x)
    assert not eq.ok
    assert {e.path for e in eq.outputs if not e.ok} == {"output[1].keys[1]"}


def test_deploy_holds_on_a_model_returning_a_plain_object():
    x = torch.randn(1, 4, 6, 6)
    result, reference = deployed(WithCache(), x, protocols=False)
    out, expected = result(x), reference(x)
    assert type(out[1]) is KeyValueCache
    assert_close(out[1].keys[1], expected[1].keys[1])
    assert batch_norm_calls(result, x) == 0


def test_verify_says_it_cannot_compare_a_leaf_it_cannot_look_into():
    reference = WithCache(holder=Slotted).eval()
    eq = trainfer.verify(reference, copy.deepcopy(reference), torch.randn(1, 4, 6, 6))
    assert not eq.ok
    assert "cannot compare a Slotted" in str(eq)


# --- 1. children called by keyword -------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn()

    def forward(self, hidden_states: Tensor, scale: float = 1.0) -> Tensor:
        return self.block(hidden_states) * scale


class KeywordCaller(nn.Module):
    """An untraceable root (data-dependent branch) calling its child by keyword only."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:  # data-dependent: fx cannot trace the root
            x = x * 2
        return self.encoder(hidden_states=x, scale=0.5)


def test_children_called_by_keyword_are_folded():
    x = torch.randn(2, 4, 6, 6)
    result, reference = deployed(KeywordCaller(), x, protocols=False)
    assert_close(result(x), reference(x))
    assert batch_norm_calls(result, x) == 0


# --- 8. untraceable modules that mutate the list they are given --------------------------------------


class ListMutator(nn.Module):
    """``x[i] = self.m[i](x[i])`` on the caller's list, then a 5-D view (YOLO's IDetect heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.ModuleList([nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1)])

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        for i in range(len(x)):
            x[i] = self.m[i](x[i])
            b, _, h, w = x[i].shape
            x[i] = x[i].view(b, 2, 3, h, w)
        return x


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.down, self.head = conv_bn(), nn.Conv2d(4, 4, 3, 2, 1), ListMutator()

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.stem(x)
        if a.sum() > 1e9:
            a = a * 2
        return self.head([a, self.down(a)])


def test_a_module_mutating_its_list_input_is_folded_around_without_raising():
    x = torch.randn(1, 4, 8, 8)
    result, reference = deployed(Detector(), x, protocols=False)
    for out, expected in zip(result(x), reference(x)):
        assert_close(out, expected)
    assert batch_norm_calls(result, x) == 0


def test_an_exception_while_folding_a_part_falls_back_with_a_reason(monkeypatch):
    from trainfer.reparam.fold import driver

    real = driver._fold_graph

    def failing(gm, inputs, prefix, log):
        if prefix == "encoder.":
            raise RuntimeError("boom")
        return real(gm, inputs, prefix, log)

    monkeypatch.setattr(driver, "_fold_graph", failing)
    x = torch.randn(1, 4, 6, 6)
    result, reference = deployed(KeywordCaller(), x, protocols=False)
    report = result.trainfer_report
    assert any("encoder" in item and "boom" in item for item in report.fallbacks)
    assert_close(result(x), reference(x))


class ExtraLevel(nn.Module):
    """torchvision's FPN ``LastLevelMaxPool``: appends a level to the lists it is given, returns them."""

    def forward(self, x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        names.append("pool")
        x.append(F.max_pool2d(x[-1], 1, 2, 0))
        return x, names


class Pyramid(nn.Module):
    """An untraceable parent (``list(chunk)`` iterates a value) whose parameter-free child mutates lists."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([conv_bn(2), conv_bn(2)])
        self.extra = ExtraLevel()

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = [block(part) for block, part in zip(self.blocks, list(x.chunk(2, dim=1)))]
        features, names = self.extra(features, ["0", "1"])
        return OrderedDict(zip(names, features))


def test_a_child_that_appends_to_the_lists_it_is_given_keeps_doing_so_when_folded_on_its_own():
    """fx drops ``call_method`` nodes whose result is unused: ``names.append`` and ``x.append``
    must survive dead-code elimination, or the folded FPN loses its ``"pool"`` level."""
    x = torch.randn(1, 4, 8, 8)
    result, reference = deployed(Pyramid(), x, protocols=False)
    out = result(x)
    assert list(out) == ["0", "1", "pool"]
    for name, expected in reference(x).items():
        assert_close(out[name], expected)
    assert batch_norm_calls(result, x) == 0


# --- 9. inputs that are lists of tensors; keyword inputs ---------------------------------------------


class ListInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn()

    def forward(self, images: list[Tensor]) -> list[Tensor]:
        return [self.body(image[None])[0] for image in images]


def test_a_list_of_tensors_is_one_positional_argument_when_wrapped_in_a_tuple():
    images = [torch.randn(4, 6, 6), torch.randn(4, 8, 8)]
    result, reference = deployed(ListInput(), (images,), protocols=False)
    for out, expected in zip(result(images), reference(images)):
        assert_close(out, expected)
    assert batch_norm_calls(result, images) == 0
    assert result.trainfer_report.verification["float32"].inputs_checked == 3


def test_verify_draws_random_inputs_inside_lists():
    class Different(nn.Module):
        def forward(self, images: list[Tensor]) -> Tensor:
            return images[0] * (images[0].abs() < 100)  # equal on the example, not on random inputs

    class Same(nn.Module):
        def forward(self, images: list[Tensor]) -> Tensor:
            return images[0]

    images = [torch.full((2, 3), 0.5)]
    eq = trainfer.verify(Same(), Same(), (images,))
    assert eq.ok and eq.inputs_checked == 6  # 1 example + 2 random, in float64 and float32
    images = [torch.full((2, 3), 200.0)]
    assert not trainfer.verify(Same(), Different(), (images,)).ok


def test_keyword_inputs_are_given_with_example_kwargs():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_bn()

        def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
            y = self.body(x)
            return y if mask is None else y * mask

    x, mask = torch.randn(1, 4, 6, 6), (torch.rand(1, 1, 6, 6) > 0.5).float()
    result, reference = deployed(Masked(), x, example_kwargs={"mask": mask}, protocols=False)
    assert_close(result(x, mask=mask), reference(x, mask=mask))
    assert batch_norm_calls(result, x, mask) == 0  # the form takes the arguments the example gave


# --- 3. forwards wrapped with functools.wraps ------------------------------------------------------


def can_return_tuple(forward):
    """Like Hugging Face's decorator: a ``(self, *args, **kwargs)`` wrapper around ``forward``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        output = forward(self, *args, **kwargs)
        return output if return_dict else tuple(output.values())

    return wrapper


class Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    @can_return_tuple
    def forward(self, x: Tensor, output_hidden: bool = False, **kwargs) -> OrderedDict:
        return OrderedDict(out=self.bn(self.conv(x)))


def test_a_decorated_forward_is_folded():
    x = torch.randn(1, 4, 6, 6)
    result, reference = deployed(Decorated(), x, protocols=False)
    assert_close(result(x)["out"], reference(x)["out"])
    assert_close(result(x=x)["out"], reference(x=x)["out"])  # called by the model's own argument names
    assert batch_norm_calls(result, x) == 0


# --- 2. a root with *args looping over an nn.Sequential ----------------------------------------------


class Looping(nn.Module):
    """Ultralytics' ``forward(x, *args, **kwargs) -> _predict_once``: iterates ``self.model``, never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(conv_bn(), conv_bn(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.unused = conv_bn()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._predict_once(x, *args, **kwargs)

    def _predict_once(self, x: Tensor, profile: bool = False) -> Tensor:
        outputs = []
        for m in self.model:
            x = m(x)
            outputs.append(x)
        return x + outputs[0]


def test_a_sequential_that_was_iterated_is_folded_inside_and_the_report_says_what_stayed():
    x = torch.randn(1, 4, 6, 6)
    result, reference = deployed(Looping(), x, protocols=False)
    assert_close(result(x), reference(x))
    # the two conv_bn members fold; the bare Conv2d->BatchNorm2d members were iterated, not called
    # as a chain, so the BatchNorm stays (the loop may route values) and the report says why
    assert batch_norm_calls(result, x) == 1
    report = result.trainfer_report
    assert any(item.startswith("model.3") for item in report.kept), report.kept
    assert any(item.startswith("unused") and "never ran" in item for item in report.kept), report.kept


class ConvBNAct(nn.Module):
    """Ultralytics' ``Conv``: ``act(bn(conv(x)))``, with the plain attributes its parent's loop reads."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.SiLU()
        self.f = -1  # "from": read by the parent's loop, not by forward

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBNAct()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ChainLoop(nn.Module):
    """An untraceable root calling its parts one by one: chains, a residual, a part called by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleList([ConvBNAct(), Residual(), ConvBNAct()])
        self.head = Encoder()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:  # data-dependent: fx cannot trace the root
            x = x * 2
        for m in self.model:
            x = m(x) if m.f == -1 else x  # reads each part's plain attribute, like Ultralytics' loop
        return self.head(hidden_states=x)


def test_a_part_folded_to_a_chain_of_module_calls_is_installed_as_a_sequential_and_stays_exact():
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    model = ChainLoop().double()
    for part in model.model:
        part.f = -1  # Residual has none of its own
    result, reference = deployed(model, x, protocols=False)
    assert_close(result(x), reference(x))  # float64: within 1e-9 relative
    assert batch_norm_calls(result, x) == 0
    for index in (0, 2):  # conv -> bn -> act folds to conv -> act: a plain nn.Sequential, attributes kept
        part = result.model[index]
        assert type(part) is nn.Sequential and part.f == -1, part
        assert [type(m) for m in part] == [nn.Conv2d, nn.SiLU]
        assert copy.deepcopy(part).f == -1
    # a residual is not a chain, and a part called by keyword keeps the GraphModule that takes its keywords
    assert isinstance(result.model[1], torch.fx.GraphModule) and result.model[1].f == -1
    assert isinstance(result.head, torch.fx.GraphModule)
    # the parts the fold built are in inference mode like everything else in a deploy form
    assert not any(m.training for m in result.modules()), [n for n, m in result.named_modules() if m.training]


# --- 7. plain attributes cached by forward -----------------------------------------------------------


class AnchorCache(nn.Module):
    """Caches ``self.anchor`` (built in the input's dtype), rebuilt only when the shape changes."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.anchor, self.shape = conv_bn(), None, None

    def forward(self, x: Tensor) -> Tensor:
        if self.shape != x.shape:
            self.anchor = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype) / 3
            self.shape = x.shape
        return self.body(x) + self.anchor


@pytest.mark.parametrize("warm", [False, True])
def test_plain_attribute_caches_do_not_leak_between_the_float32_and_float64_checks(warm):
    x = torch.randn(1, 4, 6, 6)
    model = AnchorCache().eval()
    if warm:  # the user ran the model before deploying it: a float32 anchor is cached
        model(x)
    result, reference = deployed(model, x, protocols=False)
    out = result(x)
    assert out.dtype == torch.float32
    assert_close(out, reference(x))


# --- 15. protocols called quietly --------------------------------------------------------------------


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.profiled = False

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) if hasattr(self, "bn") else self.conv(x)

    def fuse(self, verbose: bool = True) -> Noisy:
        print("Model summary (fused)")
        self.profiled = verbose
        self.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(self.conv, self.bn)
        del self.bn
        return self


def test_protocols_are_called_quietly(capsys):
    x = torch.randn(1, 4, 6, 6)
    result, _ = deployed(Noisy(), x)
    assert capsys.readouterr().out == ""
    assert result.trainfer_report.protocols == ["model.fuse()"]


# --- 14. report: removed, inlined and never-run modules ----------------------------------------------


class GELUActivation(nn.Module):
    """A parameter-free module that is traced through (Hugging Face's, timm's)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x)


class Pad(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.pad(x, (1, 1, 1, 1))


class WithHelpers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.act, self.pad, self.aux = conv_bn(), GELUActivation(), Pad(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pad(self.act(self.body(x)))


def test_the_report_tells_inlined_modules_from_never_run_ones():
    x = torch.randn(1, 4, 6, 6)
    result, _ = deployed(WithHelpers(), x, protocols=False)
    report = result.trainfer_report
    assert "aux: never runs in inference" in report.removed
    assert not any(item.startswith(("act:", "pad:")) for item in report.removed), report.removed
    assert [item.split(":")[0] for item in report.inlined] == ["act", "pad"]


# --- 6. selections: float64 strict, float32 tolerant of near-ties ------------------------------------


class TopBoxes(nn.Module):
    """Scores -> top-k -> boxes gathered at the winners (a detector's post-processing); ``nudge``
    moves score 1 by that much relative to the scores' scale, as a different rounding would."""

    def __init__(self, nudge: float = 0.0) -> None:
        super().__init__()
        self.nudge = nudge

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scores = x + self.nudge * x.abs().max() * (torch.arange(x.shape[-1]) == 1)
        values, indices = scores.topk(2, dim=-1)
        boxes = 100.0 * torch.arange(x.shape[-1], dtype=x.dtype)
        return values, boxes[indices], scores.argmax(-1)


def tied_scores() -> Tensor:
    x = torch.randn(2, 6)
    x[:, 1] = x[:, 0] = x.abs().max() + 1  # an exact tie at the top: index 0 wins it
    return x


def test_a_near_tie_flipped_by_rounding_fails_a_strict_check_and_passes_the_tolerant_one():
    x = tied_scores()
    strict = trainfer.verify(TopBoxes(), TopBoxes(2e-6), x, dtypes=(torch.float32,))
    assert not strict.ok  # the winners differ (boxes gathered at them would be 100 apart)
    tolerant = trainfer.verify(TopBoxes(), TopBoxes(2e-6), x, dtypes=(torch.float32,), near_ties=True)
    assert tolerant.ok and tolerant.near_ties >= 1, str(tolerant)


def test_a_selection_that_differs_by_more_than_the_tolerance_still_fails():
    x = tied_scores()
    assert not trainfer.verify(TopBoxes(), TopBoxes(1e-3), x, dtypes=(torch.float32,), near_ties=True).ok


def test_a_flipped_threshold_is_a_near_tie_only_at_the_threshold():
    class Above(nn.Module):
        def __init__(self, nudge: float) -> None:
            super().__init__()
            self.nudge = nudge

        def forward(self, x: Tensor) -> Tensor:
            return x[x + self.nudge > 0.5]

    x = torch.randn(3, 8)
    x[0, 0] = 0.5  # exactly at the threshold: a rounding decides whether it is kept
    assert not trainfer.verify(Above(0.0), Above(2e-6), x, dtypes=(torch.float32,)).ok
    assert trainfer.verify(Above(0.0), Above(2e-6), x, dtypes=(torch.float32,), near_ties=True).ok
    assert not trainfer.verify(Above(0.0), Above(1e-2), x, dtypes=(torch.float32,), near_ties=True).ok


def test_deploy_checks_float64_strictly_and_its_dtype_tolerant_of_near_ties():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.select = conv_bn(), TopBoxes()

        def forward(self, x: Tensor):
            return self.select(self.body(x).mean((2, 3)))

    x = torch.randn(2, 4, 6, 6)
    result, reference = deployed(Head(), x, protocols=False)
    report = result.trainfer_report
    assert report.verification["float64"].near_ties == 0 and report.ok
    assert batch_norm_calls(result, x) == 0


# --- 13. the cost model weighs weights and kernel kinds, not multiply-adds alone ---------------------


def test_a_wide_1x1_conv_before_a_2x2_average_pool_is_not_merged_into_a_strided_2x2_conv():
    x = torch.randn(1, 64, 8, 8)  # DenseNet's transition: 64 channels > a third of the 64 output pixels
    model = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 1, bias=False), nn.AvgPool2d(2, 2))
    result, reference = deployed(model, x, protocols=False)
    assert_close(result(x), reference(x))
    counts = count_aten_ops(result, x)
    assert counts["convolution"] == 1 and counts["avg_pool2d"] == 1
    assert all(m.kernel_size == (1, 1) for m in result.modules() if isinstance(m, nn.Conv2d))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm: normalise over channels, then a per-channel affine."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(channels)), nn.Parameter(torch.randn(channels))

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def test_a_channels_first_layer_norms_affine_stays_elementwise_not_a_depthwise_conv():
    x = torch.randn(2, 8, 6, 6)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), LayerNorm2d(8), nn.GELU())
    result, reference = deployed(model, x, protocols=False)
    assert_close(result(x), reference(x))
    counts = count_aten_ops(result, x)
    assert counts["convolution"] == 1  # the first conv only; no depthwise 1x1 conv
    assert counts["addcmul"] == 1 and counts["mul"] == 0


# --- 12. dilated branches merge into the large kernel ------------------------------------------------


class DilatedReparam(nn.Module):
    """UniRepLKNet's dilated reparam block: a depthwise 13x13 conv-BN plus dilated depthwise branches."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()

        def branch(k: int, d: int) -> nn.Sequential:
            conv = nn.Conv2d(c, c, k, padding=d * (k - 1) // 2, dilation=d, groups=c, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c))

        self.large = branch(13, 1)
        self.dilated = nn.ModuleList([branch(7, 2), branch(3, 3), branch(3, 4), branch(3, 5)])

    def forward(self, x: Tensor) -> Tensor:
        out = self.large(x)
        for b in self.dilated:
            out = out + b(x)
        return out


def test_dilated_branches_merge_into_one_undilated_kernel():
    x = torch.randn(1, 4, 20, 20)
    result, reference = deployed(DilatedReparam(), x, protocols=False)
    assert_close(result(x), reference(x))
    counts = count_aten_ops(result, x)
    assert counts["convolution"] == 1 and batch_norm_calls(result, x) == 0
    (conv,) = [m for m in result.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (13, 13) and conv.dilation == (1, 1)


# --- 10. weights computed from parameters in forward -------------------------------------------------


class GeneratedWeight(nn.Module):
    """OREPA's pattern: the conv weight is an einsum chain of parameters, shaped with ``int(o / g)``."""

    def __init__(self, c: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.origin = nn.Parameter(torch.randn(c, c // groups, 3, 3))
        self.pointwise = nn.Parameter(torch.randn(c, c // groups, 1, 1))
        self.vector = nn.Parameter(torch.randn(2, c))
        self.groups, self.bn = groups, nn.BatchNorm2d(c)

    def weight_gen(self) -> Tensor:
        o, i, h, w = self.origin.size()
        per_group = int(o / self.groups)  # a Python int from a parameter's size: untraceable unless constant
        origin = torch.einsum("oihw,o->oihw", self.origin, self.vector[0])
        pointwise = torch.einsum("oihw,o->oihw", nn.functional.pad(self.pointwise, [1, 1, 1, 1]), self.vector[1])
        return (origin + pointwise).view(self.groups, per_group, i, h, w).reshape(o, i, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(nn.functional.conv2d(x, self.weight_gen(), padding=1, groups=self.groups))


def test_weights_generated_from_parameters_are_computed_once_and_folded():
    x = torch.randn(1, 4, 8, 8)
    result, reference = deployed(nn.Sequential(GeneratedWeight(), nn.ReLU()), x, protocols=False)
    assert_close(result(x), reference(x))
    assert dict(count_aten_ops(result, x)) == {"convolution": 1, "relu": 1}


def test_a_generated_weight_without_a_batch_norm_is_still_computed_once():
    class Bare(GeneratedWeight):
        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.conv2d(x, self.weight_gen(), padding=1, groups=self.groups)

    x = torch.randn(1, 4, 8, 8)
    result, reference = deployed(nn.Sequential(Bare(), nn.ReLU()), x, protocols=False)
    assert_close(result(x), reference(x))
    assert dict(count_aten_ops(result, x)) == {"convolution": 1, "relu": 1}


class ChannelsLastFeedForward(nn.Module):
    """UniRepLKNet's feed-forward: Linear on NHWC, permute to NCHW, BatchNorm2d, times gamma."""

    def __init__(self, c: int = 4, scale: str = "gamma") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.norm, self.gamma = nn.BatchNorm2d(c), nn.Parameter(torch.randn(c))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.fc2(torch.relu(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2))
        if self.scale == "gamma":
            return x + y * self.gamma.view(1, -1, 1, 1)
        if self.scale == "method":
            return x + y.mul(self.gamma[:, None, None])
        return x + 0.5 * y  # a Python number


@pytest.mark.parametrize("scale", ["gamma", "method", "number"])
def test_a_batch_norm_and_scale_after_a_channels_last_linear_fold_into_the_linear(scale):
    x = torch.randn(2, 4, 5, 5)
    result, reference = deployed(ChannelsLastFeedForward(scale=scale), x, protocols=False)
    assert_close(result(x), reference(x))
    counts = count_aten_ops(result, x)
    assert batch_norm_calls(result, x) == 0 and counts["convolution"] == 0 and counts["mul"] == 0
