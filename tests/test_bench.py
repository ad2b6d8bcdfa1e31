"""The measurement API (trainfer.bench) against hand-computed figures."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainfer.bench import Timing, count_macs, count_parameters, peak_memory, time_forward


def test_timing_statistics_nearest_rank():
    timing = Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert timing.median_s == 5.5
    assert timing.p90_s == 9.0
    assert timing.samples[0] == 5.0 and len(timing.samples) == 10


def test_time_forward_runs_under_inference_mode_and_restores_threads():
    calls = []

    def model(x):
        calls.append((torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return x * 2

    before = torch.get_num_threads()
    timing = time_forward(model, torch.ones(2), warmup=2, repeats=5, threads=before + 1)
    assert len(calls) == 7 and all(flag and n == before + 1 for flag, n in calls)
    assert torch.get_num_threads() == before
    assert len(timing.samples) == 5 and 0 < timing.median_s <= timing.p90_s


def test_time_forward_restores_threads_when_the_model_raises():
    before = torch.get_num_threads()

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        time_forward(broken, (torch.ones(1),), threads=before + 1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}])
def test_time_forward_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="repeats|threads"):
        time_forward(nn.Identity(), torch.ones(1), **kwargs)


def test_count_parameters_counts_shared_parameters_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), shared, shared)
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 4 + 4


def test_count_macs_of_grouped_dilated_strided_conv_and_linear():
    conv = nn.Conv2d(6, 9, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=3)
    linear = nn.Linear(9, 7)
    x = torch.randn(2, 6, 11, 10)

    def model(x):
        y = conv(x)  # (2, 9, 6, 5)
        return linear(y.mean((2, 3))), F.conv_transpose2d(y, torch.randn(9, 4, 2, 2), stride=2)

    conv_macs = 2 * 9 * 6 * 5 * (6 // 3) * 3 * 5
    linear_macs = 2 * 9 * 7
    transposed_macs = 2 * 9 * 6 * 5 * 4 * 2 * 2
    assert count_macs(model, x) == conv_macs + linear_macs + transposed_macs


def test_count_macs_of_batched_matmul_and_attention():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 8)
    assert count_macs(lambda a, b: a @ b.transpose(-1, -2), q, k) == 2 * 3 * 5 * 4 * 6
    expected = 2 * 3 * (5 * 6 * 4 + 5 * 6 * 8)
    assert count_macs(F.scaled_dot_product_attention, q, k, v) == expected


def test_peak_memory_tracks_tensor_lifetimes():
    n = 1000 * 1000

    def frees_before_the_third():
        a = torch.ones(n)
        b = a * 2
        del a
        c = b + 1
        return c.view(-1)[:10].sum()

    def keeps_all_three():
        a = torch.ones(n)
        b = a * 2
        c = b + 1
        return a, b, c

    assert 2 * 4 * n <= peak_memory(frees_before_the_third) < 2 * 4 * n + 64
    assert 3 * 4 * n <= peak_memory(keeps_all_three) < 3 * 4 * n + 64


def test_peak_memory_ignores_views_and_in_place_ops_on_existing_tensors():
    weight = torch.ones(1000, 1000)

    def reuse():
        weight.t().add_(1)
        weight.view(-1)[:5].mul_(2)

    assert peak_memory(reuse) == 0


def test_peak_memory_sees_what_autograd_keeps_for_backward():
    layers = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(64, 256)
    with torch.inference_mode():
        inference = peak_memory(lambda: layers(x))
    with_grad = peak_memory(lambda: layers(x).sum())
    assert with_grad > inference
