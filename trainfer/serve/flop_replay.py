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

    def replay(self) -> None:
        """From now on, answer calls from the record (from its first call) while they repeat it."""
        self._replaying, self._position = True, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._depth or _aliases(func):  # a part of a decomposition, a view, an in-place op: runs
            return self._counted(func, args, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        if self._replaying:
            recorded = self._matching(func, leaves, spec)
            if recorded is None:
                self._replaying = None
            elif recorded.replayable:
                self.flops += recorded.flops
                return tree_map_only(torch.Tensor, _like, recorded.result)
        snapshot = tuple(_Then.of(leaf) for leaf in leaves)
        before = self.flops
        result = self._counted(func, args, kwargs)
        if self._replaying is False:
            replayable = all(_plain(out, leaves) for out in tree_flatten(result)[0] if isinstance(out, torch.Tensor))
            self._record.append(_Call(func, spec, snapshot, result, self.flops - before, replayable))
        return result

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

    def _matching(self, func: Any, leaves: list[Any], spec: Any) -> _Call | None:
        """The next recorded call (now consumed) if this one repeats it, else ``None``."""
        if self._position >= len(self._record):
            return None
        recorded = self._record[self._position]
        if recorded.func is not func or recorded.spec != spec or len(recorded.leaves) != len(leaves):
            return None
        if not all(then.matches(now) for then, now in zip(recorded.leaves, leaves, strict=True)):
            return None
        self._position += 1
        return recorded


@dataclass(frozen=True)
class _Then:
    """A leaf of a call's arguments when recorded: a tensor by its metadata, any other value as it was."""

    value: Any
    metadata: tuple[Any, ...] | None = None

    @staticmethod
    def of(leaf: Any) -> _Then:
        return _Then(None, _metadata(leaf)) if isinstance(leaf, torch.Tensor) else _Then(leaf)

    def matches(self, leaf: Any) -> bool:
        """A tensor of the same metadata, or a non-tensor of the same type and an equal value."""
        if isinstance(leaf, torch.Tensor) or self.metadata is not None:
            return isinstance(leaf, torch.Tensor) and self.metadata == _metadata(leaf)
        return type(self.value) is type(leaf) and bool(self.value == leaf)


@dataclass(frozen=True)
class _Call:
    """One outermost call of a functional op in the recorded run: its arguments, result and flops."""

    func: Any
    spec: Any  # the pytree structure of (args, kwargs)
    leaves: tuple[_Then, ...]
    result: Any
    flops: int
    replayable: bool  # its tensors are new, plain and dense from offset 0: a copy of their metadata is the result


def _aliases(func: Any) -> bool:
    """Whether ``func`` may return a view of an argument or write one (or has no schema to tell)."""
    schema = getattr(func, "_schema", None)
    return schema is None or any(item.alias_info is not None for item in (*schema.arguments, *schema.returns))


def _metadata(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        type(tensor), tensor.layout, tensor.shape, tensor.stride(), tensor.storage_offset(), tensor.dtype,
        tensor.device, tensor.is_conj(), tensor.is_neg(),
    )  # fmt: skip


def _plain(out: torch.Tensor, leaves: list[Any]) -> bool:
    """Whether ``out`` is a new plain strided tensor from offset 0 (none of the call's arguments)."""
    fresh = not any(out is leaf for leaf in leaves)
    return fresh and type(out) is torch.Tensor and out.layout == torch.strided and out.storage_offset() == 0


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``tensor``'s shape, strides, dtype and device (on the meta device: no memory)."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
