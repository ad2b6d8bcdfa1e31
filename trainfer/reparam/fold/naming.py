"""Names of graph nodes for the log: the module or parameter path an op computes with.

``conv.forward`` for a module call, ``stages.0.weight`` for a parameter; a function call is named
after the first parameter (or constant computed from parameters) it reads, ``add_3[stages.0.scale]``.
Every name carries ``prefix``, the path of the module being folded inside the whole model.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.constants import Constants

__all__ = ["Naming"]


class Naming:
    """Names of ``constants.gm``'s nodes as paths inside the whole model (``prefix`` + local path)."""

    def __init__(self, prefix: str, constants: Constants) -> None:
        self.prefix, self.constants = prefix, constants

    def origin(self, node: fx.Node) -> str:
        """The parameter or module path a node computes with (``""`` when it reads none); local, no prefix."""
        if node.op == "call_module":
            return f"{node.target}.forward"
        if node.op == "get_attr":
            return target_name(node)
        for argument in node.all_input_nodes:
            if argument.op == "get_attr" or self.constants.known(argument):
                found = self.origin(argument)
                if found:
                    return found
        return ""

    def name(self, node: Any) -> str:
        """``prefix`` + the module path of a module call, else the node's name with its origin in brackets."""
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"{self.prefix}{node.target}"
        origin = self.origin(node)
        return f"{self.prefix}{node.name}" + (f"[{self.prefix}{origin}]" if origin else "")
