"""Every exception and warning trainfer raises, in one place so callers can catch them by name.

:class:`TrainferError` is the base of every trainfer exception: ``except trainfer.TrainferError``
catches a problem trainfer detected and explained (bad input, a refused bundle, a fold that would
not be exact), never a bug. Each subclass also derives from the built-in exception that code
written before the base existed caught (``ValueError``, ``TypeError``, ``OSError``, ...).
"""

from typing import Any, Self


class TrainferError(Exception):
    """Base of every trainfer exception: a condition trainfer detected, with a message naming it."""


class InputError(TrainferError, ValueError):
    """An argument or an input (tensor, file content, option) has an invalid value."""


class InputTypeError(TrainferError, TypeError):
    """An argument has the wrong type (e.g. a callable where an ``nn.Module`` is needed)."""


class MissingFileError(TrainferError, FileNotFoundError):
    """A file the caller named does not exist."""


class WriteError(TrainferError, OSError):
    """Writing a file failed (disk full, permission denied); the message names the path.

    Nothing was half-written: trainfer's writes are atomic (:mod:`trainfer.atomic`).
    """


class MissingExtraError(TrainferError, ImportError):
    """An optional dependency (an extra such as ``trainfer[onnx]``) is not installed."""


class AlgebraError(TrainferError, ValueError):
    """A fold that would not be exact was requested; the message names the failed condition."""


class EquivalenceError(TrainferError, ValueError):
    """Two forms of a model that should compute the same function do not.

    ``report`` holds the measured errors and, where found, the first module or region where the
    two forms part.
    """

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


class _Numbered(Exception):
    """An error naming the items at fault (samples, examples) by number: ``Error(message)``, or
    ``Error(before, items, after)`` whose message is ``before + str(items[:10]) + after``; numbers
    count from 0 within what the raiser saw, and :meth:`counted_from` renumbers them for a larger
    whole (a chunk's error, told in its whole request's or run's numbering)."""

    def __init__(self, before: str, items: list[int] | None = None, after: str = ""):
        self.before, self.items, self.after = before, items, after
        super().__init__(before if items is None else f"{before}{items[:10]}{after}")

    def counted_from(self, first: int) -> Self:
        """This error with its item numbers counted from ``first`` instead of 0."""
        if self.items is None or not first:
            return self
        return type(self)(self.before, [first + i for i in self.items], self.after)


class ExplanationError(_Numbered, TrainferError, ValueError):
    """An explanation failed its method's own check: integrated gradients whose attributions do not sum
    to ``f(x) - f(x0)`` (a score that saturates along the path, or too few steps). The message names
    the examples, both sums and what to change; no map is returned that would read as meaningful.

    Raised as ``ExplanationError(message)``, or ``ExplanationError(before, examples, after)``, numbered
    as :class:`NonFiniteError`'s samples are (:class:`_Numbered`).
    """


class ExplanationsIncomplete(ExplanationError):
    """Some examples of a run that writes explanations could not be explained (each failed its method's
    check or met NaN/inf); every other one was written. ``written``: the paths written; ``failed``:
    ``(index, name, reason)`` per example not written. ``trainfer predict --explain`` exits 1 on it."""

    def __init__(self, message: str, written: list[Any], failed: list[tuple[int, str, str]]):
        super().__init__(message)
        self.written, self.failed = written, failed  # named in the whole run's numbering: counted_from keeps it


class ExplanationWarning(UserWarning):
    """One example of a run that writes explanations could not be explained; the run goes on."""


class ModeWarning(UserWarning):
    """A forward pass ran in a mode that is probably not the intended one (e.g. forgot eval())."""


class ModeError(TrainferError, RuntimeError):
    """Raised instead of :class:`ModeWarning` when a guard is strict."""


class OutputKindWarning(UserWarning):
    """A model's outputs contradict the declared output kind (e.g. negative "probabilities")."""


class BundleError(TrainferError, ValueError):
    """A bundle or checkpoint is missing, malformed, unsafe or does not match its manifest."""


class BundleWarning(UserWarning):
    """A bundle loads, but something about it deserves attention (no preprocessing, newer writer)."""


class WriteWarning(UserWarning):
    """A write completed, but kept something it found rather than delete it (the message says where)."""


class QuantizationError(TrainferError, ValueError):
    """No int8 form within the allowed float fallback passes the accuracy gate (``report`` says why)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class PruningError(TrainferError, ValueError):
    """No pruned form within the allowed search passes the accuracy gate (``report`` says why)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class NonFiniteError(_Numbered, InputError):
    """Numbers that must be finite are not: an input that overflows its dtype once cast and
    normalised, or a model output holding NaN or inf (never served as a prediction).

    Raised as ``NonFiniteError(message)``, or ``NonFiniteError(before, samples, after)``: the message
    ``before + str(samples[:10]) + after`` names the samples at fault, which :meth:`counted_from`
    renumbers (a chunk's error, told in its whole request's numbering: :class:`_Numbered`).
    """


class DecodingError(InputError):
    """A sequence decoder got settings or scores it cannot decode: a token id outside the table, a
    blank id colliding with a label, ``max_length`` < 1, a beam width of 0 or above the bound, log-probs
    of the wrong shape, or a model whose ``step`` returns the wrong shape."""


def one_line(error: BaseException) -> str:
    """An error's message on one line, as the CLI prints it and the server answers it (not an exception)."""
    return " ".join(str(error).split()) or type(error).__name__


__all__ = [
    "AlgebraError",
    "BundleError",
    "BundleWarning",
    "DecodingError",
    "EquivalenceError",
    "ExplanationError",
    "ExplanationWarning",
    "ExplanationsIncomplete",
    "InputError",
    "InputTypeError",
    "MissingExtraError",
    "MissingFileError",
    "NonFiniteError",
    "ModeError",
    "ModeWarning",
    "OutputKindWarning",
    "PruningError",
    "QuantizationError",
    "TrainferError",
    "WriteError",
    "WriteWarning",
]
