"""Argument checks shared by the decoders: one bound per setting, one clear error per mistake."""

from __future__ import annotations

import math
import reprlib
from typing import NoReturn

import numpy as np
import torch

from trainfer.errors import DecodingError, InputError
from trainfer.integers import INT64_MAX, as_signed, integer_value

MAX_BEAM_WIDTH = 1024
"""The widest beam any decoder accepts (wider is refused as a mistake, not silently slow)."""

MAX_LENGTH = 4096
"""The longest ``max_length`` an autoregressive search accepts."""

MAX_LENGTH_PENALTY = 10.0
"""The largest ``|length_penalty|`` accepted (a bundle's bound too): ``length ** 1e300`` overflows, and
beyond +-10 the length alone decides the ranking."""

#: The dtypes ``lengths`` may have: every integer one (booleans and quantized integers are no counts).
_INTEGER_DTYPES = frozenset(
    {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64}
)

MAX_PRIOR_SCORE = 1e6
"""The largest magnitude of a finite log-score a CTC ``prior`` may give (``-inf`` forbids an extension): beyond
it a score drowns the log-probabilities it is added to (float32 keeps about 7 digits), and summed over the
frames it overflows (a prior of 1e38 gave inf, then NaN, reported as a fault of ``log_probs``)."""

LOG_PROB_SLACK = 1e-3
"""How far above 0 a log-probability may be (rounding of a ``log_softmax``); a larger value is no
log-probability: raw logits passed where ``log_softmax(logits)`` was meant, the classic mistake."""


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` (an int or a NumPy integer scalar: :func:`trainfer.integers.integer_value`) as an ``int`` in
    ``[low, high]``, else a DecodingError naming ``name`` and the bounds."""
    number = integer_value(value)
    if number is None:
        raise DecodingError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= number <= high:
        raise DecodingError(f"{name} must be in [{low}, {high}], got {number}")
    return number


def check_beam_width(value: object, name: str = "beam_width") -> int:
    """A beam width in ``[1, MAX_BEAM_WIDTH]``."""
    return check_int(name, value, 1, MAX_BEAM_WIDTH)


def check_token_id(name: str, value: object, vocab: int) -> int:
    """A token id inside a table of ``vocab`` tokens (an int or a NumPy integer scalar, not a bool), as an ``int``."""
    number = integer_value(value)
    if number is None:
        raise DecodingError(f"{name} must be an int token id, got {type(value).__name__}")
    if not 0 <= number < vocab:
        raise DecodingError(f"{name} id {number} is outside the token table of {vocab} tokens")
    return number


def check_finite_float(name: str, value: object, bound: float = MAX_LENGTH_PENALTY) -> float:
    """A finite real number in ``[-bound, bound]`` (``length_penalty``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DecodingError(f"{name} must be a finite number in [{-bound:g}, {bound:g}], got {value!r}")
    if abs(value) > bound:
        raise DecodingError(f"{name} must be in [{-bound:g}, {bound:g}], got {value!r}")
    return float(value)


def check_scores(scores: object, what: str, shape: tuple[int | None, ...], values: bool = True) -> torch.Tensor:
    """A floating tensor of ``shape`` (None: any size) holding no NaN and no +inf (-inf is a zero probability).

    ``values=False`` checks type and shape only: for a caller that finds NaN and +inf itself (a
    top-k ranks them first), and refuses them with :func:`refuse_not_log_probs`.
    """
    if not isinstance(scores, torch.Tensor):
        raise DecodingError(f"{what} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise DecodingError(f"{what} must be floating point log-probabilities, got {scores.dtype}")
    if scores.shape != shape and (  # the first test settles every fully known shape at once
        scores.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, scores.shape))
    ):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise DecodingError(f"{what} must have shape {want}, got {tuple(scores.shape)}")
    if not values:
        return scores
    total = float(scores.sum())  # NaN or +inf when any entry is NaN or +inf (one reduction, then a precise look)
    if (total != total or total == float("inf")) and bool((torch.isnan(scores) | torch.isposinf(scores)).any()):
        refuse_not_log_probs(what)
    return scores


def check_prior_scale(scores: torch.Tensor) -> None:
    """Refuse a prior's finite log-scores beyond :data:`MAX_PRIOR_SCORE` in magnitude (its own message, not a
    fault of the log-probabilities it would overflow)."""
    finite = scores[torch.isfinite(scores)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    if largest > MAX_PRIOR_SCORE:
        raise DecodingError(
            f"the prior's output holds {largest:.4g} in magnitude: expected log-scores in [-{MAX_PRIOR_SCORE:g}, "
            f"{MAX_PRIOR_SCORE:g}] (MAX_PRIOR_SCORE), or -inf to forbid an extension"
        )


def check_at_most_zero(scores: torch.Tensor, what: str) -> None:
    """Refuse finite log-probabilities above :data:`LOG_PROB_SLACK` (NaN and +inf are left to :func:`check_scores`)."""
    largest = float(scores.max()) if scores.numel() else 0.0
    if math.isfinite(largest) and largest > LOG_PROB_SLACK:
        raise DecodingError(
            f"{what} holds {largest:.4g} > 0: log-probabilities are <= 0 (up to {LOG_PROB_SLACK:g} of rounding); "
            "pass log_softmax(logits), not the logits"
        )


def check_items(count: int, what: str) -> int:
    """``count`` items to decode, at least one (an empty batch is a caller's mistake, not an empty answer)."""
    if count < 1:
        raise DecodingError(f"{what} must hold at least one item to decode, got a batch of {count}")
    return count


def refuse_impossible(items: list[int], what: str) -> NoReturn:
    """The error for items no finite-probability sequence was found for: every path meets a ``-inf`` score."""
    raise DecodingError(
        f"{what} give item(s) {items[:10]} no sequence of finite log-probability (every path meets a -inf score, "
        "probability 0): nothing to decode; expected log-probabilities that leave some path possible"
    )


def refuse_not_log_probs(what: str) -> NoReturn:
    """The error for scores holding NaN or +inf."""
    raise DecodingError(f"{what} holds NaN or +inf; log-probabilities must be finite or -inf")


def check_lengths(lengths: object, batch: int, frames: int) -> torch.Tensor:
    """Per-item frame counts in ``[0, frames]`` (None: every item uses all frames), as int64.

    ``lengths`` is a tensor, NumPy array or sequence of ``batch`` integers of any integer dtype: the
    unsigned ones torch barely supports (uint16, uint32, uint64) are read as the same values
    (:func:`trainfer.integers.as_signed`), as are NumPy integer scalars in a list and arrays of either
    byte order; booleans (an array of them or one in a list, which torch would read as 0 or 1), floats,
    anything torch cannot read as numbers, a sparse or meta tensor and a value outside ``[0, frames]``
    (a uint64 above 2**63 - 1 too) are a :class:`DecodingError`.
    """
    if lengths is None:
        return torch.full((batch,), frames, dtype=torch.long)
    expected = f"lengths must be {batch} integers"
    tensor = _lengths_tensor(lengths, expected, frames)
    if tensor.shape != (batch,) or tensor.dtype not in _INTEGER_DTYPES:
        raise DecodingError(f"{expected}, got shape {tuple(tensor.shape)} {tensor.dtype}")
    try:
        signed: torch.Tensor | None = as_signed(tensor)
    except InputError:  # uint64 values above 2**63 - 1: beyond any frame count
        signed = None
    if signed is None or bool((signed < 0).any()) or bool((signed > frames).any()):
        raise _outside_frames(frames, tensor.tolist())
    return signed.to(torch.long)


def _outside_frames(frames: int, values: list[int]) -> DecodingError:
    """The error for frame counts outside ``[0, frames]``, however they were given (list, array, tensor)."""
    return DecodingError(f"lengths must be in [0, {frames}], got {values}")


def _lengths_tensor(lengths: object, expected: str, frames: int) -> torch.Tensor:
    """``lengths`` as a dense tensor holding values, or a DecodingError starting with ``expected`` (a list of
    integers beyond int64, which no tensor holds, is refused as outside ``[0, frames]``, as an array is)."""
    refused = DecodingError(f"{expected}, got {type(lengths).__name__} {reprlib.repr(lengths)}")
    if isinstance(lengths, list | tuple):
        if any(_is_boolean(item) for item in lengths):
            raise refused
        lengths = [int(item) if isinstance(item, np.integer) else item for item in lengths]
        if any(isinstance(item, int) and abs(item) > INT64_MAX for item in lengths):
            raise _outside_frames(frames, lengths)
    elif isinstance(lengths, np.ndarray) and not lengths.dtype.isnative:  # torch reads native byte order only
        lengths = lengths.astype(lengths.dtype.newbyteorder("="))
    try:
        tensor = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError):  # text, ragged lists, Python ints beyond 64 bits
        raise refused from None
    if tensor.layout != torch.strided or tensor.is_meta:
        raise DecodingError(
            f"{expected} in a dense tensor holding values, got a {tensor.layout} tensor on {tensor.device}"
        )
    return tensor


def _is_boolean(item: object) -> bool:
    """A Python or NumPy boolean, or a boolean array or tensor: torch reads one inside a list as 0 or 1."""
    if isinstance(item, torch.Tensor):
        return item.dtype == torch.bool
    return isinstance(item, bool | np.bool_) or (isinstance(item, np.ndarray) and item.dtype == np.bool_)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are summed in: the input's, at least float32."""
    return torch.promote_types(dtype, torch.float32)
