"""Per-layer quantization sensitivity: how much quantizing one layer alone costs, and why.

:func:`sensitivity` fake-quantizes one Conv2d/Linear at a time (per-channel symmetric weights, uint8 input
with its calibrated range) and measures the network output's SQNR; the most sensitive layers are the ones
:func:`trainfer.quantize` keeps in float first.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LayerSensitivity", "quantizable_layers", "sensitivity"]


@dataclass
class LayerSensitivity:
    """How much quantizing one layer alone costs, and the weight ranges that explain it.

    ``sqnr_db``: signal-to-quantization-noise ratio of the network output when only this layer's
    weights (per-channel int8) and input (uint8, calibrated range) are quantized; lower = more
    sensitive. ``weight_sqnr_db``: the same ratio for the layer's weights alone. ``channel_range``:
    min, median and max over output channels of ``max |W[c]|``.
    """

    name: str
    sqnr_db: float
    weight_sqnr_db: float
    channel_range: tuple[float, float, float]

    @property
    def outlier_ratio(self) -> float:
        """Largest over median per-channel weight range."""
        return self.channel_range[2] / self.channel_range[1] if self.channel_range[1] > 0 else math.inf

    def __str__(self) -> str:
        low, median, high = self.channel_range
        return (
            f"{self.name:<28}{self.sqnr_db:>9.1f}{self.weight_sqnr_db:>10.1f}"
            f"   {low:.3g} / {median:.3g} / {high:.3g} (max/median {self.outlier_ratio:.1f})"
        )


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """The layers quantization acts on (Conv2d and Linear), by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _fake_weight(weight: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric quantization to ``bits`` (what the QDQ file stores)."""
    levels = 2 ** (bits - 1) - 1
    step = weight.abs().flatten(1).amax(1).clamp_min(1e-12) / levels
    step = step.reshape(-1, *[1] * (weight.dim() - 1))
    return (weight / step).round().clamp(-levels, levels) * step


def _fake_activation(x: Tensor, low: float, high: float) -> Tensor:
    """Asymmetric uint8 quantization of ``x`` with the calibrated range (widened to hold 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    step = max(high - low, 1e-12) / 255
    zero = round(-low / step)
    return ((x / step).round() + zero).clamp(0, 255).sub(zero) * step


def _sqnr_db(reference: Tensor, candidate: Tensor) -> float:
    """``10 log10(signal / noise)`` in dB (signal counted as at least 1e-300), +inf without noise. Taken as a
    difference of logarithms: the ratio itself underflows to 0 when the noise is over about 1e308 times the
    signal (a zero output, far-off candidate), where ``log10`` would raise."""
    noise = float((reference.double() - candidate.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if noise == 0 else 10 * (math.log10(max(signal, 1e-300)) - math.log10(noise))


@torch.no_grad()
def sensitivity(model: nn.Module, inputs: Tensor, weight_bits: int = 8) -> list[LayerSensitivity]:
    """Per-layer sensitivity of ``model`` on ``inputs``, most sensitive (lowest SQNR) first."""
    model = copy.deepcopy(model).float().eval()
    layers = quantizable_layers(model)
    ranges: dict[str, list[float]] = {}

    def observe(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            low, high = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, [low, high])
            ranges[name] = [min(old[0], low), max(old[1], high)]

        return hook

    handles = [module.register_forward_pre_hook(observe(name)) for name, module in layers]
    reference = model(inputs)
    for handle in handles:
        handle.remove()
    results = []
    for name, module in layers:
        weight = module.weight.data.clone()
        quantized = _fake_weight(weight, weight_bits)
        low, high = ranges[name]
        handle = module.register_forward_pre_hook(lambda m, a, lo=low, hi=high: (_fake_activation(a[0], lo, hi),))
        module.weight.data.copy_(quantized)
        output = model(inputs)
        module.weight.data.copy_(weight)
        handle.remove()
        per_channel = weight.abs().flatten(1).amax(1)
        spread = (float(per_channel.min()), float(per_channel.median()), float(per_channel.max()))
        results.append(LayerSensitivity(name, _sqnr_db(reference, output), _sqnr_db(weight, quantized), spread))
    return sorted(results, key=lambda layer: layer.sqnr_db)
