"""What a forward pass really executes: aten operators counted through a ``TorchDispatchMode``.

Counting dispatched ops, not module types, sees functional calls (``F.batch_norm``) and ops a
module runs inside its own ``forward``. ``bench`` builds multiply-adds and memory on the same hook.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["BATCH_NORM_OPS", "AtenOpCounter", "batch_norm_calls", "count_aten_ops"]


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

    Names are overload packets, e.g. ``convolution``, ``_native_batch_norm_legit_no_training``.
    """
    with torch.no_grad(), AtenOpCounter() as counter:
        model(*inputs)
    return counter.counts


#: The aten kernels that compute a batch norm, on every backend.
BATCH_NORM_OPS = frozenset(
    {
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "cudnn_batch_norm",
        "miopen_batch_norm",
        "_batch_norm_impl_index",
    }
)


def batch_norm_calls(model: nn.Module, *inputs: Any) -> int:
    """How many batch-norm kernels a forward pass executes (0 after a complete fold)."""
    return sum(n for name, n in count_aten_ops(model, *inputs).items() if name in BATCH_NORM_OPS)
