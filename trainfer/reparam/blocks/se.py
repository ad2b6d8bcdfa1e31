"""Squeeze-and-excitation (Hu et al. 2018), the channel attention RepVGG and MobileOne may use."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SqueezeExcite(nn.Module):
    """``x * sigmoid(up(relu(down(mean_hw(x)))))`` with 1x1 convs ``C -> max(1, C // reduction) -> C``.

    Not linear in ``x``: blocks keep it as its own module after their fused conv.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.down = nn.Conv2d(channels, hidden, 1, device=device, dtype=dtype)
        self.relu = nn.ReLU()
        self.up = nn.Conv2d(hidden, channels, 1, device=device, dtype=dtype)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.up(self.relu(self.down(self.pool(x)))))
