"""Which device a model is served on: ``"auto"`` picks CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch

from trainfer.errors import InputError

__all__ = ["pick_device"]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, then Apple MPS, then CPU; anything else as ``torch.device``."""
    if str(device) != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError as error:
            raise InputError(f"unknown device {device!r}: expected auto, cpu, cuda, cuda:N or mps ({error})") from None
        if chosen.type not in SERVING_DEVICE_TYPES:
            raise InputError(f"device {str(device)!r}: expected auto, cpu, cuda, cuda:N or mps (one that computes)")
        if not _available(chosen):
            raise InputError(f"device {str(device)!r} is not available on this machine (try device='auto' or 'cpu')")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: The device types a model computes on: others torch knows (``meta`` holds no data, ``xla``,
#: ``hpu`` and friends need their own runtime) are refused by name.
SERVING_DEVICE_TYPES = ("cpu", "cuda", "mps")


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and mps.is_available()
    return True
