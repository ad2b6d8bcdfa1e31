"""How an autoregressive model plugs into the searches: ``encode`` once, then ``step`` per token.

A user's GRU or transformer decoder needs no trainfer layer, only two methods (a protocol)::

    class MyModel(nn.Module):
        def encode(self, inputs) -> state: ...
        def step(self, state, tokens) -> (log_probs, state): ...

``state`` is whatever the model carries between steps (encoder outputs, hidden states, a cache).
The searches reorder it after every step to follow the surviving beams, by
:func:`reorder_state`: tensors, and tuples, lists and dicts of them, whose FIRST dimension is the row
(item x beam), are indexed along it; None passes through. A model whose state is laid out otherwise
(a GRU's ``(layers, rows, hidden)``) transposes in ``step``, or defines
``reorder_state(state, index) -> state`` itself, which then takes precedence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from trainfer.errors import DecodingError


@runtime_checkable
class StepModel(Protocol):
    """The autoregressive model interface.

    ``encode(inputs)`` returns the initial state for the N items of ``inputs`` (rows first).
    ``step(state, tokens)`` takes the state of R rows and the ``(R,)`` int64 previous tokens (the
    ``bos`` id at the first step) and returns ``(R, V)`` next-token log-probabilities (normalised:
    log-softmax) and the new state.
    """

    def encode(self, inputs: Any) -> Any: ...

    def step(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


def reorder_state(state: Any, index: torch.Tensor, rows: int) -> Any:
    """``state`` with every tensor's first dimension (``rows`` long) indexed by ``index``.

    Tensors, tuples, lists and dicts (recursively) and None are understood; anything else, or a
    tensor whose first dimension is not ``rows``, is refused with a DecodingError naming where.
    """
    return _reorder(state, index, rows, ())


def _reorder(state: Any, index: torch.Tensor, rows: int, path: tuple[Any, ...]) -> Any:
    """``state`` reordered; ``path`` (the keys leading to it) names it in errors only (no work per step)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        if state.dim() == 0 or state.shape[0] != rows:
            raise DecodingError(
                f"{_where(path)} has shape {tuple(state.shape)}; decoder state tensors need the {rows} rows "
                "(items x beams) first, or a reorder_state(state, index) method on the model"
            )
        return state.index_select(0, index if index.device == state.device else index.to(state.device))
    if isinstance(state, tuple | list):
        return type(state)([_reorder(s, index, rows, (*path, i)) for i, s in enumerate(state)])
    if isinstance(state, dict):
        return {k: _reorder(v, index, rows, (*path, k)) for k, v in state.items()}
    raise DecodingError(
        f"{_where(path)} is a {type(state).__name__}; give the model a reorder_state(state, index) method to reorder it"
    )


def _where(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{key!r}]" for key in path)


def reorder(model: Any, state: Any, index: torch.Tensor, rows: int) -> Any:
    """The model's own ``reorder_state(state, index)`` when it has one, else :func:`reorder_state`."""
    return reorderer(model)(state, index, rows)


def reorderer(model: Any) -> Callable[[Any, torch.Tensor, int], Any]:
    """``f(state, index, rows)``: :func:`reorder` for ``model``, its method looked up once (per search)."""
    own = getattr(model, "reorder_state", None)
    if callable(own):
        return lambda state, index, rows: own(state, index)
    return reorder_state


def batch_size(state: Any) -> int:
    """N: the first dimension of the first tensor found in the initial state."""
    if isinstance(state, torch.Tensor) and state.dim() > 0:
        return int(state.shape[0])
    if isinstance(state, tuple | list):
        items = list(state)
    elif isinstance(state, dict):
        items = list(state.values())
    else:
        items = []
    for item in items:
        try:
            return batch_size(item)
        except DecodingError:
            continue
    raise DecodingError("encode() returned no tensor with a batch dimension; pass batch_size= explicitly")


def state_device(state: Any) -> torch.device:
    """Where the searches keep their own tensors: the first non-CPU device among the state's tensors, else the CPU."""
    if isinstance(state, torch.Tensor):
        return state.device
    items = list(state) if isinstance(state, tuple | list) else list(state.values()) if isinstance(state, dict) else []
    for item in items:
        found = state_device(item)
        if found.type != "cpu":
            return found
    return torch.device("cpu")
