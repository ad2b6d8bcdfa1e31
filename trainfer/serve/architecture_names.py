"""The strings of a recorded architecture that may reach code: fx pastes node targets, keyword names and
the class name into the Python it generates, so each is proven a plain identifier first, and module
or tensor paths are made of identifiers that shadow nothing (or container indices).
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from torch import fx, nn

from trainfer.errors import BundleError

__all__ = ["CODE_NAMES", "IDENTIFIER", "identifier", "module_path", "path_part"]

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_INDEX = re.compile(r"[0-9]{1,9}")
#: Names an ``nn.Module``/``GraphModule`` already uses: a child or tensor of that name would shadow them.
_MODULE_NAMES = frozenset(dir(fx.GraphModule)) | frozenset(vars(nn.Module()))
#: A name fx's generated ``forward`` takes itself (a parameter shadowing a global it uses, ``torch``
#: say, is caught when :func:`~trainfer.serve.computation_check.check_computation` runs that code).
CODE_NAMES = frozenset({"self"})


def identifier(value: Any, where: str, reserved: frozenset[str] = frozenset()) -> str:
    """``value`` if it is a plain ASCII identifier (``fullmatch``: no trailing newline), not a keyword,
    not a dunder and not ``reserved``: the only strings fx may paste into the code it generates."""
    if (
        not isinstance(value, str)
        or not IDENTIFIER.fullmatch(value)
        or keyword.iskeyword(value)
        or value.startswith("__")
        or value in reserved
    ):
        shown = repr(value)[:120]
        extra = f", not one of {sorted(reserved)[:8]}{' ...' if len(reserved) > 8 else ''}" if reserved else ""
        raise BundleError(f"{where}: expected a plain identifier (ASCII, no keyword, no dunder{extra}), found {shown}")
    return value


def path_part(part: str, where: str) -> str:
    """One part of a module or tensor path: an identifier that shadows nothing, or a container index."""
    return part if _INDEX.fullmatch(part) else identifier(part, where, _MODULE_NAMES)


def module_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= 2000 or path.count(".") > 63:
        raise BundleError(f"{where}: expected a dotted path of at most 64 names, found {repr(path)[:120]}")
    for part in path.split("."):
        path_part(part, f"{where}: {path[:120]!r}")
    return path
