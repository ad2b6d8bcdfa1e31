"""Constant evaluation: the values of graph nodes that do not depend on the model's inputs.

A node is constant when it reads a parameter or buffer (``get_attr``) or is a function or method
call whose arguments are all constant (``w * g / w.norm()``, a weight standardisation, ...). Values
are computed once, without autograd, and cached per node.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import torch
from torch import Tensor, fx

from trainfer.reparam.fold.calls import target_name

__all__ = ["Constants", "NotConstant"]


class NotConstant(Exception):
    """A node's value depends on the model's inputs."""


class Constants:
    """The constant values of ``gm``'s nodes (computed on demand, cached)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._values: dict[fx.Node, Any] = {}
        tensors = [*gm.parameters(), *gm.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")

    def value(self, value: Any) -> Any:
        """``value`` itself, or the node's constant value; raises :class:`NotConstant` if it depends on inputs."""
        if not isinstance(value, fx.Node):
            return value
        if value not in self._values:
            self._values[value] = self._evaluate(value)
        result = self._values[value]
        if result is NotConstant:
            raise NotConstant(value.name)
        return result

    def known(self, node: fx.Node) -> bool:
        """``node`` was evaluated and is constant (no evaluation happens here)."""
        return node in self._values and self._values[node] is not NotConstant

    def tensor(self, value: Any) -> Tensor | None:
        """The constant tensor ``value`` is (detached), or None."""
        try:
            constant = self.value(value)
        except NotConstant:
            return None
        return constant.detach() if isinstance(constant, Tensor) else None

    def bias(self, bias: Any, weight: Tensor) -> Tensor:
        """``bias`` as a constant tensor (zeros when absent); raises :class:`NotConstant` otherwise."""
        if bias is None:
            return weight.new_zeros(weight.shape[0])
        value = self.tensor(bias)
        if value is None:
            raise NotConstant("bias")
        return value

    def operand(self, value: Any) -> Tensor | None:
        """A constant operand as a tensor; Python numbers in float64, so ``x * 0.1`` folds to 0.1's double."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float64, device=self.device)
        return self.tensor(value) if isinstance(value, fx.Node) else None

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return reduce(getattr, target_name(node).split("."), self.gm)
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            return NotConstant
        try:
            args = fx.node.map_arg(node.args, self.value)
            kwargs = fx.node.map_arg(node.kwargs, self.value)
        except NotConstant:
            return NotConstant
        with torch.no_grad():
            if isinstance(node.target, str):  # call_method: only call_function nodes have callable targets
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
