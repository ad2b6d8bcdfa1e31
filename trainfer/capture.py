"""Record what each submodule receives and returns during a forward pass.

One mechanism serves ``verify``'s divergence localisation and ``inspect``'s per-layer records
(:func:`capture`, outputs), and the folder's and protocols' replays (:func:`capture_inputs`,
positional and keyword inputs, copied): hooks registered on entry and always removed on exit,
also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

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


def snapshot(value: Any) -> Any:
    """A copy of ``value`` whose tensors are detached clones, containers included (tuples, lists,
    dicts and their subclasses rebuilt as their own type where they allow it).

    A recorded call must not change when the model later mutates what it was given (a list of
    feature maps assigned into, a tensor updated in place).
    """
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    if isinstance(value, tuple):
        items = [snapshot(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, Mapping):
        return {k: snapshot(v) for k, v in value.items()}
    return value


@dataclass
class Call:
    """The inputs of one call of a module: positional ``args`` and keyword ``kwargs`` (copies)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@contextmanager
def capture_inputs(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, Call]]:
    """Yield a dict that fills with the first call (:class:`Call`, copied with :func:`snapshot`)
    of each named submodule of ``model``; forward pre-hooks with keyword arguments, always removed."""
    calls: dict[str, Call] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in calls:
                calls[name] = Call(snapshot(tuple(args)), snapshot(dict(kwargs)))

        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()
