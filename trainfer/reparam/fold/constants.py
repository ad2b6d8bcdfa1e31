"""Constant evaluation: the values of graph nodes that do not depend on the model's inputs.

A node is constant when it reads a parameter or buffer (``get_attr``) or is a function or method
call whose arguments are all constant (``w * g / w.norm()``, a weight standardisation, ...). Values
are computed once, without autograd, and cached per node.

:func:`precompute` replaces each computed constant an input-dependent node reads (a weight generated
from parameters in ``forward``, OREPA's einsum chains) by a buffer holding its value, so the
deployed form does not generate it again on every call.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Any

import torch
from torch import Tensor, fx

from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.linearity import NotLinear

__all__ = ["Constants", "NotConstant", "precompute"]


class NotConstant(NotLinear):
    """A node's value depends on the model's inputs (a handler that needed it as a constant is not linear).

    The message names the value; the log reason is empty: an input-dependent operand is no news.
    """

    def __init__(self, what: str) -> None:
        Exception.__init__(self, what)
        self.reason = ""


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


def precompute(gm: fx.GraphModule, constants: Constants) -> int:
    """Replace each computed constant tensor read by a non-constant node with a buffer; return how many.

    Only values no larger than the tensors they are computed from are stored (``pos_embed.repeat(...)``
    stays a computation), so the deployed form never holds more than the model did.
    """
    stored = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or not node.users:
            continue
        try:
            value = constants.value(node)
        except NotConstant:
            continue
        sources = [constants.value(n) for n in node.all_input_nodes]
        budget = sum(t.numel() for t in sources if isinstance(t, Tensor))
        if not isinstance(value, Tensor) or value.numel() > budget:
            continue
        if any(user.op == "output" or _writes_in_place(user) for user in node.users):
            continue  # returned, or updated in place: the model makes a fresh tensor each call
        if all(_is_constant(constants, user) for user in node.users):
            continue  # a later constant reads it: store that one instead
        name = f"_precomputed_{stored}"
        while hasattr(gm, name):
            stored += 1
            name = f"_precomputed_{stored}"
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            attribute = gm.graph.get_attr(name)
        attribute.meta = dict(node.meta)
        node.replace_all_uses_with(attribute)
        stored += 1
    return stored


def _is_constant(constants: Constants, node: fx.Node) -> bool:
    try:
        constants.value(node)
    except NotConstant:
        return False
    return True


def _writes_in_place(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x += y``, ``x[i] = v``: the node may overwrite its first argument."""
    if node.op == "call_method":
        return target_name(node).endswith("_")
    return node.op == "call_function" and node.target in _WRITING


_WRITING = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
