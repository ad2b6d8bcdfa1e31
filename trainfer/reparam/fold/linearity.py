"""The one way a fold handler says that a node is not linear: it raises :class:`NotLinear`."""

from __future__ import annotations

__all__ = ["NotLinear"]


class NotLinear(Exception):
    """The node is not a linear step here; ``reason`` (may be empty) goes to the log under "not folded".

    A handler raises it, or lets it propagate from the context's methods (``context.chain`` when the
    step is not exact, ``context.constant`` never raises: it returns None; ``constants.bias`` raises
    :class:`~trainfer.reparam.fold.constants.NotConstant`, a subclass, for a bias computed from the
    input). An empty reason means there is nothing worth reporting (not a tensor, not this pattern).
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
