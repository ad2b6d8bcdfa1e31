"""The structure of a model's output: which tensor of a tuple, named-tuple or dict output is the
prediction (:func:`select_output`), and a JSON description of that structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from trainfer.errors import InputError

__all__ = ["Selector", "describe_structure", "flatten_outputs", "pick", "select_output"]

Selector = int | str | None


def select_output(output: Any, which: Selector = None) -> Tensor:
    """The prediction tensor inside ``output``: ``which`` is a tuple index or a dict/named-tuple key.

    By default: the tensor itself, the first element of a tuple, or the first value of a dict.
    """
    if isinstance(output, Tensor):
        if which not in (None, 0):
            raise InputError(f"output={which!r} selects from a tuple or dict, but the model returns one tensor")
        return output
    value = pick(output, which)
    if not isinstance(value, Tensor):
        raise InputError(f"output {which!r} is {type(value).__name__}, expected a tensor")
    return value


def pick(structure: Any, which: Selector) -> Any:
    """Element ``which`` of a dict, tuple, list or named tuple (first element by default)."""
    if isinstance(structure, Mapping):
        keys = list(structure)
        key = keys[0] if which is None and keys else which
        if key not in structure:
            raise InputError(f"output={which!r} is not among the model's outputs {keys}")
        return structure[key]
    if isinstance(structure, tuple | list) and structure:
        if isinstance(which, str):
            fields = getattr(structure, "_fields", ())
            if which not in fields:
                raise InputError(f"output={which!r} is not a field of the model's output; fields: {list(fields)}")
            return getattr(structure, which)
        index = 0 if which is None else which
        if not -len(structure) <= index < len(structure):
            raise InputError(f"output={which!r} is out of range: the model returns {len(structure)} outputs")
        return structure[index]
    raise InputError(f"the model returned {type(structure).__name__}; expected a tensor, a tuple or a dict of tensors")


def describe_structure(output: Any) -> dict[str, Any]:
    """A JSON-able description of an output: ``tensor``, ``tuple`` (length, fields) or ``dict`` (keys)."""
    if isinstance(output, Tensor):
        return {"type": "tensor"}
    if isinstance(output, Mapping):
        return {"type": "dict", "keys": [str(k) for k in output]}
    if isinstance(output, tuple | list):
        fields = list(getattr(output, "_fields", ()))
        return {"type": "tuple", "length": len(output), **({"fields": fields} if fields else {})}
    raise InputError(f"the model returned {type(output).__name__}; expected a tensor, a tuple or a dict of tensors")


def flatten_outputs(output: Any) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of a one-level output structure (names: dict keys, ``output_i``, ``output``)."""
    structure = describe_structure(output)
    if structure["type"] == "tensor":
        return ["output"], [output]
    if structure["type"] == "dict":
        return list(structure["keys"]), [select_output(output, k) for k in output]
    names = structure.get("fields") or [f"output_{i}" for i in range(len(output))]
    return names, [select_output(output, i) for i in range(len(output))]
