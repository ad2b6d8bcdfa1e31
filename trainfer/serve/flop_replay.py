"""Floating-point operations of two runs of the same graph on the meta device, the second replayed from the
first's record (see :class:`FlopReplay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry

from trainfer.serve.meta_shortcuts import shortcut

__all__ = ["FlopReplay"]


class FlopReplay(TorchDispatchMode):
    """Counts floating-point operations as :class:`torch.utils.flop_counter.FlopCounterMode` does (the formulas
    of ``flop_registry`` on each aten call; an op outside it that has a CompositeImplicitAutograd kernel
    is decomposed first and its parts counted) in :attr:`flops`, and records each outermost call of an op
    that neither aliases nor writes its arguments (views and in-place ops always run).

    After :meth:`replay`, such calls are answered from that record while they repeat it call for call: the
    same op, non-tensor arguments of the same types and values, tensors of the same metadata (type, layout,
    shape, strides, storage offset, dtype, device, conjugate and negative bits). Such a call gets a new
    tensor of the recorded result's metadata and adds the recorded flops again: on the meta device a
    functional op's result and its flops depend on nothing else, so a replayed call counts and returns
    what running it would (a call that raised ended the recorded run: the record holds none). The first
    call that differs ends the replay: it and every later call run (and are counted) as recorded ones did.
    A second run of the same graph through other code (fx's generated code after its interpreter) thus
    costs a comparison per call instead of a meta kernel (many are PyTorch's Python reference
    decompositions, ~0.1 to 2 ms each), and is checked and counted as if it had run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self._record: list[_Call] = []
        self._replaying: bool | None = False  # False: recording; True: replaying; None: running (no record)
        self._position = 0
        self._depth = 0
        self._aliasing: dict[Any, bool] = {}

    def replay(self) -> None:
        """From now on, answer calls from the record (from its first call) while they repeat it."""
        self._replaying, self._position = True, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._depth or self._aliases(func):  # a part of a decomposition, a view, an in-place op: runs
            return self._counted(func, args, kwargs)
        tensors: list[torch.Tensor] = []
        key = (func, _described(args, tensors), _described(kwargs, tensors))
        if self._replaying:
            recorded = self._record[self._position] if self._position < len(self._record) else None
            if recorded is None or recorded.key != key:
                self._replaying = None
            else:
                self._position += 1
                if recorded.replayable:
                    self.flops += recorded.flops
                    return tree_map_only(torch.Tensor, _like, recorded.result)
        before = self.flops
        result = self._counted(func, args, kwargs)
        if self._replaying is False:
            outs = [out for out in tree_flatten(result)[0] if isinstance(out, torch.Tensor)]
            replayable = all(_plain(out, tensors) for out in outs)
            self._record.append(_Call(key, result, self.flops - before, replayable))
        return result

    def _aliases(self, func: Any) -> bool:
        """Whether ``func`` may return a view of an argument or write one (or has no schema to tell)."""
        if func not in self._aliasing:
            schema = getattr(func, "_schema", None)
            items = (*schema.arguments, *schema.returns) if schema is not None else ()
            self._aliasing[func] = schema is None or any(item.alias_info is not None for item in items)
        return self._aliasing[func]

    def _counted(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``func`` run and counted as ``FlopCounterMode`` does (its ``__torch_dispatch__``, module tracking
        left out; the calls of a decomposition come back here nested), or its result made directly where
        :func:`~trainfer.serve.meta_shortcuts.shortcut` knows it (ops without a flop formula)."""
        quick = shortcut(func, args, kwargs)  # an op outside flop_registry whose result is known: nothing to count
        if quick is not None:
            return quick
        self._depth += 1
        try:
            if func not in flop_registry and func is not torch.ops.prim.device.default:
                with self:
                    decomposed = func.decompose(*args, **kwargs)
                    if decomposed is not NotImplemented:
                        return decomposed
            out = func(*args, **kwargs)
            if func._overloadpacket in flop_registry:
                self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            return out
        finally:
            self._depth -= 1


@dataclass(frozen=True)
class _Call:
    """One outermost call of a functional op in the recorded run: its arguments, result and flops."""

    key: tuple[Any, ...]  # the op and its arguments as :func:`_described` describes them
    result: Any
    flops: int
    replayable: bool  # its tensors are new, plain and dense from offset 0: a copy of their metadata is the result


def _described(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` as a comparable tuple: a tensor by its metadata (type, layout, shape, strides, storage offset,
    dtype, device, conjugate and negative bits; appended to ``tensors``), a list, tuple or dict by its type
    and items, anything else by its type and value."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return (
            type(value), value.layout, value.shape, value.stride(), value.storage_offset(), value.dtype,
            value.device, value.is_conj(), value.is_neg(),
        )  # fmt: skip
    if isinstance(value, list | tuple):
        return type(value), tuple(_described(item, tensors) for item in value)
    if isinstance(value, dict):
        return dict, tuple((key, _described(item, tensors)) for key, item in value.items())
    return type(value), value


def _plain(out: torch.Tensor, leaves: list[Any]) -> bool:
    """Whether ``out`` is a new plain strided tensor from offset 0 (none of the call's arguments)."""
    fresh = not any(out is leaf for leaf in leaves)
    return fresh and type(out) is torch.Tensor and out.layout == torch.strided and out.storage_offset() == 0


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``tensor``'s shape, strides, dtype and device (on the meta device: no memory)."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
