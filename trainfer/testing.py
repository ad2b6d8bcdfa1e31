"""Tools for proving two forms equal: non-trivial BatchNorm statistics, tolerances, op counts.

Used by trainfer's own tests and benchmarks, and public so users can check their models the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

#: Relative error (max |a - b| / max |b|) accepted per dtype when two forms are compared.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    Fresh BatchNorm is the identity in eval mode (mean 0, var 1, gamma 1, beta 0), so an
    equivalence check on it proves nothing about the folding of statistics.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._NormBase) or module.running_mean is None:
                continue
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
            module.running_var.copy_(_uniform(shape, 0.5, 2.0, generator))
            if module.weight is not None:
                module.weight.copy_(_uniform(shape, 0.5, 1.5, generator))
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.5)
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(100)
    return model


def _uniform(shape: torch.Size, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def relative_error(candidate: Tensor, reference: Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` (error relative to the output scale)."""
    scale = reference.detach().abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((candidate.detach() - reference.detach()).abs().max() / scale)


def assert_close(candidate: Tensor, reference: Tensor, tolerance: float | None = None) -> float:
    """Assert equal shapes and relative error within ``TOLERANCE[dtype]``; return the error."""
    assert candidate.shape == reference.shape, f"shape {tuple(candidate.shape)} != {tuple(reference.shape)}"
    error = relative_error(candidate, reference)
    limit = tolerance if tolerance is not None else TOLERANCE[reference.dtype]
    assert error <= limit, f"relative error {error:.3e} exceeds {limit:.0e} ({reference.dtype})"
    return error


class AtenOpCounter(TorchDispatchMode):
    """Count every aten operator dispatched inside the ``with`` block into ``counts``.

    ``observe(func, args, kwargs, out)``, when given, also sees each call and its result: the one
    hook for measurements built on real executed ops (multiply-adds, tensor memory in ``bench``).
    """

    def __init__(self, observe: Callable[[Any, Any, dict[str, Any], Any], None] | None = None) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.observe = observe

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.observe is not None:
            self.observe(func, args, kwargs, out)
        return out


def count_aten_ops(model: nn.Module, *inputs: Any) -> Counter[str]:
    """Run ``model(*inputs)`` under no_grad and count the aten operators it really executes.

    Counting dispatched ops, not module types, sees functional calls (``F.batch_norm``) too.
    Names are overload packets, e.g. ``convolution``, ``_native_batch_norm_legit_no_training``.
    """
    with torch.no_grad(), AtenOpCounter() as counter:
        model(*inputs)
    return counter.counts


BATCH_NORM_OPS = frozenset(
    {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
     "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_impl_index"}
)


def batch_norm_calls(model: nn.Module, *inputs: Any) -> int:
    """How many batch-norm kernels a forward pass executes (0 after a complete fold)."""
    return sum(n for name, n in count_aten_ops(model, *inputs).items() if name in BATCH_NORM_OPS)
