"""Every exception and warning trainfer raises, in one place so callers can catch them by name."""

from trainfer.algebra import AlgebraError


class EquivalenceError(AssertionError):
    """Two forms of a model that should compute the same function do not.

    ``report`` holds the measured errors and, where found, the first module or region where the
    two forms part.
    """

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


class ModeWarning(UserWarning):
    """A forward pass ran in a mode that is probably not the intended one (e.g. forgot eval())."""


class ModeError(RuntimeError):
    """Raised instead of :class:`ModeWarning` when a guard is strict."""


class OutputKindWarning(UserWarning):
    """A model's outputs contradict the declared output kind (e.g. negative "probabilities")."""


class BundleError(ValueError):
    """A bundle or checkpoint is missing, malformed, unsafe or does not match its manifest."""


__all__ = ["AlgebraError", "BundleError", "EquivalenceError", "ModeError", "ModeWarning", "OutputKindWarning"]


class NonFiniteError(ValueError):
    """Numbers that must be finite are not: an input that overflows its dtype once cast and
    normalised, or a model output holding NaN or inf (never served as a prediction)."""


__all__ += ["NonFiniteError"]
