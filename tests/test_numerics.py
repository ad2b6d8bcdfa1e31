"""Whether numbers are finite: NumPy's view and torch's test agree on every kind of tensor."""

import numpy as np
import pytest
import torch

from trainfer.numerics import all_finite, all_finite_array, numpy_view

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, *NON_FINITE])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "requires_grad", "empty"])
def test_all_finite_is_torch_isfinite_all_whatever_the_tensor(dtype, bad, layout):
    tensor = torch.linspace(-3e4, 3e4, 12, dtype=torch.float64).reshape(3, 4).to(dtype)
    if bad is not None:
        tensor[2, 1] = bad
    if layout == "transposed":
        tensor = tensor.t()
    elif layout == "requires_grad":
        tensor.requires_grad_(True)
    elif layout == "empty":
        tensor = tensor[:0]
    assert all_finite(tensor) is bool(torch.isfinite(tensor).all())


def test_only_cpu_tensors_numpy_can_read_outside_autograd_have_a_view():
    assert numpy_view(torch.zeros(2, dtype=torch.bfloat16)) is None
    assert numpy_view(torch.zeros(2, requires_grad=True)) is None
    assert numpy_view(torch.zeros(2, dtype=torch.int64)) is None
    view = numpy_view(torch.zeros(2, 3).t())
    assert isinstance(view, np.ndarray) and view.shape == (3, 2)


@pytest.mark.parametrize("bad", NON_FINITE)
def test_all_finite_array_finds_one_bad_number_among_many(bad):
    array = np.ones((64, 1, 8, 8), np.float32)
    assert all_finite_array(array)
    array[63, 0, 7, 7] = bad
    assert not all_finite_array(array)
