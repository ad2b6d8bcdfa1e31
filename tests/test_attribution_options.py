"""Every option of every explanation method is checked before Captum runs (attacker round 7, finding 3):
one line naming the option, what it expects and what it was given, never Captum's own error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainfer.analysis import attribution_options
from trainfer.analysis.attribution import attribute, feature_mask
from trainfer.analysis.attribution_options import (
    MAX_BASELINES,
    MAX_SAMPLES,
    MAX_STEPS,
    OPTIONS,
    check_options,
    example_rows,
    most_examples_at_once,
)
from trainfer.errors import InputError, InputTypeError, NonFiniteError

pytest.importorskip("captum")
X = torch.rand(2, 1, 8, 8)
INTS = torch.zeros(1, 1, 8, 8, dtype=torch.long)
DENSE_FLOAT32 = "baselines must be a dense float32 tensor on cpu, as the inputs are; "


def image_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3)).eval()


CASES = [
    # resource bombs: each ran for ever or allocated without bound
    ("integrated_gradients", {"n_steps": 10**9}, InputError, f"n_steps must be an integer in [1, {MAX_STEPS}]; got"),
    ("kernel_shap", {"n_samples": 10**10}, InputError, f"n_samples must be an integer in [1, {MAX_SAMPLES}]"),
    ("lime", {"n_samples": 10**10}, InputError, "n_samples must be an integer in [1, 10000]"),
    ("gradient_shap", {"n_samples": 10**10}, InputError, "n_samples must be an integer in [1, 10000]"),
    ("occlusion", {"perturbations_per_eval": 10**9}, InputError, "perturbations_per_eval must be an integer in [1, "),
    ("gradient_shap", {"baselines": torch.zeros(10**5, 1, 8, 8)}, InputError, f"with B in [1, {MAX_BASELINES}]"),
    # zero, negative, wrong type
    ("integrated_gradients", {"n_steps": 0}, InputError, "n_steps must be an integer in [1, 10000]; got 0"),
    (
        "integrated_gradients",
        {"n_steps": 2.5},
        InputTypeError,
        "n_steps must be an integer in [1, 10000]; got float 2.5",
    ),
    ("integrated_gradients", {"internal_batch_size": 0}, InputError, "internal_batch_size must be an integer in [1, "),
    ("integrated_gradients", {"internal_batch_size": -1}, InputError, "internal_batch_size must be an integer in [1, "),
    ("kernel_shap", {"n_samples": -3}, InputError, "n_samples must be an integer in [1, 10000]; got -3"),
    ("kernel_shap", {"patch": 0}, InputError, "patch must be an integer in [1, 8]; got 0"),  # was the default
    ("lime", {"patch": 10**9}, InputError, "patch must be an integer in [1, 8]; got 1000000000"),
    ("lime", {"show_progress": "yes"}, InputTypeError, "show_progress must be True or False; got str 'yes'"),
    ("gradient_shap", {"stdevs": float("nan")}, InputError, "stdevs must be a number in [0, inf]; got nan"),
    ("gradient_shap", {"stdevs": torch.tensor([0.1, 0.2])}, InputTypeError, "stdevs must be a number in [0, inf]; got"),
    # shapes and values of tensors
    ("integrated_gradients", {"baselines": torch.zeros(3, 3)}, InputError, "got a float32 tensor of shape (3, 3)"),
    ("integrated_gradients", {"baselines": float("inf")}, InputError, "baselines must be finite"),
    ("integrated_gradients", {"baselines": np.float32("nan")}, InputError, "baselines must be finite; got nan"),
    ("occlusion", {"baselines": torch.tensor(-np.inf)}, InputError, "baselines must be finite; got -inf"),
    ("integrated_gradients", {"baselines": np.array([0.5])}, InputTypeError, "finite number or a float tensor"),
    ("lime", {"baselines": np.bool_(True)}, InputTypeError, "a float tensor of samples; got bool np.True_"),
    ("kernel_shap", {"baselines": torch.tensor(1j)}, InputTypeError, "got a complex64 tensor of shape ()"),
    ("integrated_gradients", {"baselines": torch.tensor(0.5, device="meta")}, InputTypeError, "tensor of shape ()"),
    ("gradient_shap", {"baselines": torch.zeros(0, 1, 8, 8)}, InputError, "got shape (0, 1, 8, 8)"),
    (
        "deeplift_shap",
        {"baselines": torch.zeros(1, 1, 8, 8)},
        InputError,
        "with B in [2, 1000]; got shape (1, 1, 8, 8)",
    ),
    ("kernel_shap", {"feature_mask": INTS + 10**12}, InputError, "feature ids in [0, 63]; got ids from 1000000000000"),
    ("kernel_shap", {"feature_mask": INTS - 1}, InputError, "feature ids in [0, 63]; got ids from -1 to -1"),
    (
        "kernel_shap",
        {"feature_mask": torch.tensor([3, 2**63 + 1] * 32, dtype=torch.uint64).reshape(1, 1, 8, 8)},
        InputError,
        f"feature ids in [0, 63]; got ids from 3 to {2**63 + 1}",
    ),
    ("lime", {"feature_mask": (INTS + 200).to(torch.uint8)}, InputError, "[0, 63]; got ids from 200 to 200"),
    ("lime", {"feature_mask": torch.rand(1, 1, 8, 8)}, InputTypeError, "feature_mask must be an integer tensor"),
    ("lime", {"feature_mask": INTS, "patch": 2}, InputError, "give feature_mask= or patch="),
    ("occlusion", {"sliding_window_shapes": (0, 0, 0)}, InputError, "each of sliding_window_shapes must be an integer"),
    ("occlusion", {"sliding_window_shapes": (1, 100, 100)}, InputError, "in [1, 8]; got 100"),
    ("occlusion", {"strides": 0}, InputError, "each of strides must be an integer in [1, 1]; got 0"),
    (
        "occlusion",
        {"sliding_window_shapes": (1, 2, 2), "strides": (1, 3, 3)},
        InputError,
        "strides must be at most the",
    ),
    # tensors the inputs cannot be combined with (attacker round 8, finding 5): refused, never cast
    (
        "integrated_gradients",
        {"baselines": X[:1].double()},
        InputTypeError,
        DENSE_FLOAT32 + "got a float64 tensor on cpu",
    ),
    ("occlusion", {"baselines": X[:1].half()}, InputTypeError, DENSE_FLOAT32 + "got a float16 tensor on cpu"),
    ("gradient_shap", {"baselines": X.double()}, InputTypeError, DENSE_FLOAT32 + "got a float64 tensor on cpu"),
    ("integrated_gradients", {"baselines": X[:1].to("meta")}, InputTypeError, "got a float32 tensor on meta"),
    ("lime", {"baselines": X[:1].to_sparse()}, InputTypeError, DENSE_FLOAT32 + "got a sparse_coo float32 tensor"),
    ("kernel_shap", {"feature_mask": INTS.to("meta")}, InputTypeError, "feature_mask must be a dense tensor on cpu"),
    # one feature: nothing to weigh it against (Kernel SHAP's NaN distribution)
    ("kernel_shap", {"feature_mask": INTS}, InputError, "kernel_shap needs at least 2 features to weigh against"),
    (
        "kernel_shap",
        {"patch": 8},
        InputError,
        "needs at least 2 features to weigh against each other; the feature mask",
    ),
    ("lime", {"feature_mask": INTS}, InputError, "lime needs at least 2 features"),
    ("lime", {"feature_mask": torch.cat([feature_mask(X, 2), INTS])}, InputError, "the feature mask gives 1 "),
    # keywords no method takes here
    ("integrated_gradients", {"bogus": 1}, InputTypeError, "got unknown keyword argument(s) ['bogus']"),
    ("integrated_gradients", {"return_convergence_delta": True}, InputTypeError, "['return_convergence_delta']"),
    ("integrated_gradients", {"additional_forward_args": (1, 2)}, InputTypeError, "['additional_forward_args']"),
    ("lime", {"return_input_shape": False}, InputTypeError, "['return_input_shape']"),
]


@pytest.mark.parametrize(("method", "options", "error", "message"), CASES)
def test_a_bad_option_is_one_clear_line_before_captum_runs(monkeypatch, method, options, error, message):
    monkeypatch.setattr("trainfer.analysis.attribution_methods.require", lambda *a: pytest.fail("Captum was loaded"))
    with pytest.raises(error) as raised:
        attribute(image_net(), X, method, **options)
    assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_every_option_of_every_method_has_a_check():
    assert {name for names in OPTIONS.values() for name in names} == set(attribution_options._CHECKS)


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32, torch.uint64]
)
@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_a_feature_mask_of_any_integer_dtype_explains_as_its_int64_ids_do(method, dtype):
    mask = feature_mask(X, 4)
    torch.manual_seed(1)
    expected = attribute(image_net(), X, method, n_samples=8, feature_mask=mask).values
    torch.manual_seed(1)
    assert torch.equal(attribute(image_net(), X, method, n_samples=8, feature_mask=mask.to(dtype)).values, expected)


REAL_DTYPES = [
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
]


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("form", ["numpy scalar", "0-d array", "0-d tensor"])
@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_a_baseline_given_as_any_real_scalar_explains_as_the_python_number_does(method, form, dtype):
    """``np.float32(0.5)`` was refused while ``np.float64(0.5)``, a ``float`` subclass, was taken: every
    NumPy real scalar, 0-d array and 0-d tensor is one number, as a ``float``, the same attributions."""
    value = np.array(1, dtype=dtype)  # 1 in every real dtype, exactly
    given = {"numpy scalar": value[()], "0-d array": value, "0-d tensor": torch.from_numpy(value)}[form]
    options = {"n_steps": 4} if method == "integrated_gradients" else {"show_progress": False}
    expected = attribute(image_net(), X, method, baselines=1.0, **options).values
    assert type(check_options(method, X, {"baselines": given})["baselines"]) is float
    assert torch.equal(attribute(image_net(), X, method, baselines=given, **options).values, expected)


@pytest.mark.parametrize("stdevs", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.int64(1), 1])
def test_stdevs_given_as_any_real_number_reaches_gradient_shap_as_a_float(stdevs):
    assert type(check_options("gradient_shap", X, {"stdevs": stdevs})["stdevs"]) is float
    assert attribute(image_net(), X, "gradient_shap", n_samples=3, stdevs=stdevs).values.shape == X.shape


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("integrated_gradients", {"n_steps": 4, "internal_batch_size": 4, "baselines": torch.zeros(1, 1, 8, 8)}),
        ("occlusion", {"sliding_window_shapes": (1, 2, 2), "strides": (1, 2, 2), "baselines": 0.5}),
        ("kernel_shap", {"n_samples": 8, "patch": 4, "perturbations_per_eval": 2, "show_progress": False}),
        ("lime", {"n_samples": 18, "feature_mask": feature_mask(X, 2)}),
        ("gradient_shap", {"n_samples": 3, "stdevs": 0.1, "baselines": torch.zeros(2, 1, 8, 8)}),
        ("deeplift_shap", {"baselines": torch.zeros(2, 1, 8, 8)}),
        ("saliency", {"abs": False}),
    ],
)
def test_good_options_at_their_ordinary_values_still_run(method, options):
    assert attribute(image_net(), X, method, **options).values.shape == X.shape


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("occlusion", {"perturbations_per_eval": 300}),
        ("kernel_shap", {"perturbations_per_eval": 700}),
        ("gradient_shap", {"n_samples": 1500}),
        ("gradient_shap", {"baselines": torch.zeros(900, 1, 64, 64)}),
        ("deeplift_shap", {"baselines": torch.zeros(1000, 1, 64, 64)}),
    ],
)
def test_most_examples_at_once_keeps_the_options_valid_for_that_many_examples_and_no_more(method, options):
    """explain_to_files explains chunks of at most this many examples: an option valid for one stays valid."""
    sample = (1, 64, 64)
    most = most_examples_at_once(method, sample, options)
    check_options(method, torch.zeros(most, *sample), options)  # at most 100 samples here
    with pytest.raises(InputError, match="must be an integer in"):
        check_options(method, torch.zeros(most + 1, *sample), options)


def test_most_examples_at_once_bounds_the_batch_itself_and_ignores_options_of_the_wrong_kind():
    assert most_examples_at_once("integrated_gradients", (1, 64, 64), {}) == 2**28 // 4096
    assert most_examples_at_once("occlusion", (1, 64, 64), {"perturbations_per_eval": "many"}) == 2**28 // 4096
    assert most_examples_at_once("saliency", (3, 8192, 8192), {}) == 1  # one such image is more than the bound


def test_example_rows_gives_a_part_of_the_batch_its_rows_of_per_example_options():
    batch = torch.rand(4, 1, 8, 8)
    per_example, shared = torch.rand(4, 1, 8, 8), torch.rand(1, 1, 8, 8)
    rows = example_rows("occlusion", {"baselines": per_example, "strides": 2}, batch, 1, 3)
    assert torch.equal(rows["baselines"], per_example[1:3]) and rows["strides"] == 2
    assert example_rows("occlusion", {"baselines": shared}, batch, 1, 3)["baselines"] is shared
    assert example_rows("deeplift_shap", {"baselines": per_example}, batch, 1, 3)["baselines"] is per_example
    masks = torch.arange(4).reshape(4, 1, 1, 1).expand(4, 1, 8, 8)
    assert example_rows("lime", {"feature_mask": masks}, batch, 1, 3)["feature_mask"].unique().tolist() == [1, 2]


def test_a_table_of_one_column_has_one_feature_for_kernel_shap():
    with pytest.raises(InputError, match="kernel_shap needs at least 2 features"):
        attribute(nn.Linear(1, 2), torch.rand(3, 1), "kernel_shap")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gradient_shap", {"stdevs": 1e308}),  # finite, but its noise overflows float32
        ("gradient_shap", {"baselines": torch.full((2, 1, 8, 8), 3e38)}),  # finite in float32
        ("deeplift_shap", {"baselines": torch.full((2, 1, 8, 8), 3e38)}),
        ("occlusion", {"baselines": 3e38}),
        ("integrated_gradients", {"baselines": 3e38}),
    ],
)
def test_attributions_holding_nan_or_inf_are_refused_never_returned(method, options):
    """Finite options that overflow float32 on the way: 64 inputs of 3e38 summed (a tanh would saturate instead)."""
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        linear[1].weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]).expand(3, 64))
    with pytest.raises(
        NonFiniteError, match=r"NaN or inf.*example\(s\) \[0, 1\]|example\(s\) \[0, 1\] hold NaN or inf"
    ):
        attribute(linear, X, method, **options)


def test_kernel_shap_and_lime_refuse_a_surrogate_of_more_values_than_the_bound():
    """Attacker round 13, F1: patch=1 on one 3x128x128 image at n_samples=8000 held 4.2 GB (the design matrix)."""
    image = torch.zeros(1, 3, 64, 64)
    with pytest.raises(InputError, match=r"n_samples x features = 5000 x 4096 = 20,480,000 values, at most 16,777,216"):
        check_options("lime", image, {"patch": 1, "n_samples": 5000})
    check_options("kernel_shap", image, {"patch": 2, "n_samples": MAX_SAMPLES})  # 10000 x 1024: within
    spread = torch.zeros(1, 3, 64, 64, dtype=torch.long)
    spread[0, 0, -1, -1] = 4095  # two ids, but Captum's surrogate spans ids 0 to 4095: 4096 columns
    with pytest.raises(InputError, match="5000 x 4096"):
        check_options("kernel_shap", image, {"feature_mask": spread, "n_samples": 5000})
    with pytest.raises(InputError, match=r"at least features \+ 2 = 16386 for the 16384 features, more than the most"):
        check_options("lime", torch.zeros(1, 3, 128, 128), {"patch": 1})


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_kernel_shap_and_lime_refuse_fewer_samples_than_features_plus_two(method):
    """Attacker round 13, F4: one sample gave all-zero attributions, and LIME an R^2 of 1."""
    with pytest.raises(InputError, match=r"n_samples must be at least features \+ 2 = 8 for the 6 features; got 1"):
        attribute(nn.Linear(6, 1), torch.rand(1, 6), method, n_samples=1)
    check_options(method, torch.rand(1, 6), {"n_samples": 8})


def test_the_default_n_samples_grows_to_the_features_plus_two():
    """A table of 300 columns is fitted with 302 samples, not the default 200 (one forward row each)."""
    rows = []
    model = nn.Linear(300, 1)
    model.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    attribute(model, torch.rand(1, 300), "lime", perturbations_per_eval=1)
    assert sum(rows) == 1 + 302  # the scores checked once, then one row per sample


def test_a_given_perturbations_per_eval_is_bounded_by_the_perturbed_elements():
    """Attacker round 13, F3: 200 occluded copies of a 3x128x128 image took 1.4 GB; 2**22 elements allow 85."""
    image = torch.zeros(1, 3, 128, 128)
    assert attribution_options.MAX_PERTURBED_ELEMENTS // (3 * 128 * 128) == 85
    check_options("occlusion", image, {"perturbations_per_eval": 85})
    with pytest.raises(InputError, match=r"perturbations_per_eval must be an integer in \[1, 85\]; got 86"):
        check_options("occlusion", image, {"perturbations_per_eval": 86})
    check_options("lime", torch.zeros(8, 3, 512, 512), {"perturbations_per_eval": 1})  # 1 is always allowed
