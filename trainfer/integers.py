"""Integer tensors and arrays read as the numbers they hold, whatever their dtype.

torch implements few operations (comparisons, ``max``, indexing) for its unsigned integers wider than a
byte, uint16, uint32 and uint64, and a uint64 (NumPy's or torch's) holds values up to 2**64 - 1, beyond
int64's 2**63 - 1. Every integer a caller hands trainfer (model inputs, labels, a decoder's ``lengths``)
is therefore read as int64 by :func:`as_signed`, the same values, or refused naming how many values
int64 cannot hold and the largest; :func:`check_uint64_array` refuses a uint64 array (a memory-mapped
``.npy`` file) by the same rule without holding it whole. A single integer a caller passes (a decoder's
token id) may be a Python ``int`` or a NumPy integer scalar, never a boolean (:func:`integer_value`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError

__all__ = ["INT64_MAX", "as_signed", "check_uint64_array", "integer_value"]

#: torch's unsigned integer types wider than a byte: most operations (``max``, comparisons) are not
#: implemented for them, so :func:`as_signed` gives their values as int64.
_WIDE_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
#: The largest int64, 2**63 - 1.
INT64_MAX = torch.iinfo(torch.int64).max
#: The most elements :func:`check_uint64_array` reads at once (8 MiB of uint64).
_ELEMENTS_AT_ONCE = 2**20


def as_signed(tensor: Tensor) -> Tensor:
    """``tensor`` with the same values as int64 when it is uint16, uint32 or uint64 (the answer is then that
    of the same numbers given as int64); a uint64 value above 2**63 - 1, which int64 cannot hold, is an
    :class:`InputError` naming how many there are and the largest."""
    if tensor.dtype not in _WIDE_UNSIGNED:
        return tensor
    if tensor.dtype == torch.uint64:
        wrapped = tensor.view(torch.int64)  # the same bits: values above 2**63 - 1 read negative
        negative = wrapped < 0
        if bool(negative.any()):
            raise _beyond_int64("uint64 input", int(negative.sum()), int(wrapped[negative].max()) + 2**64)
        return wrapped  # shares the input's memory
    return tensor.to(torch.int64)


def integer_value(value: object) -> int | None:
    """``value`` as an ``int`` when it is one integer: a Python ``int`` or a NumPy integer scalar (``np.int64``,
    ``np.uint64``, ...); else None, for a ``bool`` or ``np.bool_`` too (True is no id)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return None
    return int(value)


def check_uint64_array(array: np.ndarray, what: str) -> None:
    """Refuse a uint64 ``array`` (``what`` names it) holding values above 2**63 - 1 as :func:`as_signed`
    refuses it, counting them in the whole array. Read a few samples at a time, so a memory-mapped
    file is never held whole: a file read a sample at a time is refused with its own count, not the
    count of the first sample that holds one."""
    if array.dtype.kind != "u" or array.dtype.itemsize != 8:
        return
    rows = max(1, _ELEMENTS_AT_ONCE // max(1, math.prod(array.shape[1:])))
    count, largest = 0, 0
    for start in range(0, len(array), rows):
        chunk = array[start : start + rows]
        beyond = chunk[chunk > INT64_MAX]
        if beyond.size:
            count, largest = count + beyond.size, max(largest, int(beyond.max()))
    if count:
        raise _beyond_int64(what, count, largest)


def _beyond_int64(what: str, count: int, largest: int) -> InputError:
    return InputError(
        f"{what} holds {count} value(s) above {INT64_MAX} (2**63 - 1, the largest int64), the largest "
        f"{largest}: expected integers up to {INT64_MAX}, or float input"
    )
