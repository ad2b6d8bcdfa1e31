"""Record what each submodule returns during a forward pass.

One mechanism serves ``verify``'s divergence localisation and ``inspect``'s per-layer records:
forward hooks registered on entry and always removed on exit, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

Recorder = Callable[[str, nn.Module, Any], Any]


def _keep_detached(name: str, module: nn.Module, output: Any) -> Any:
    return output.detach().clone() if hasattr(output, "detach") else output


@contextmanager
def capture(
    model: nn.Module,
    record: Recorder = _keep_detached,
    include: Callable[[str, nn.Module], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield a dict that fills, in execution order, with ``record(name, module, output)``.

    ``name`` is the module's qualified name (``""`` for the root); a module that runs more than
    once gets ``name#2``, ``name#3``, ... for its later calls. ``include`` filters modules.
    """
    records: dict[str, Any] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            key, count = name, 1
            while key in records:
                count += 1
                key = f"{name}#{count}"
            records[key] = record(name, module, output)

        return hook

    try:
        for name, module in model.named_modules():
            if include is None or include(name, module):
                handles.append(module.register_forward_hook(hook_for(name)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
