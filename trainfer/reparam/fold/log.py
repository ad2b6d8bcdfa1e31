"""What the folder reports: :class:`FoldLog` (one per :func:`~trainfer.reparam.fold.fold` call) of
:class:`FoldedRegion` entries and reasons, and :func:`describe` for the modules it builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["FoldLog", "FoldedRegion", "describe"]


@dataclass
class FoldedRegion:
    """One linear region rewritten as one module: ``members`` (original ops) -> ``name``.

    ``feeds`` names the modules that read the new module's output (for divergence reports).
    """

    name: str
    members: list[str]
    module: str
    feeds: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name} = {self.module}  <-  {', '.join(self.members)}"


@dataclass
class FoldLog:
    """What :func:`~trainfer.reparam.fold.fold` did: regions folded, ops kept and why, no-ops dropped, fallbacks."""

    regions: list[FoldedRegion] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)


def describe(module: nn.Module) -> str:
    """``Conv2d(8->8, kernel=(3, 3), ...)`` / ``Linear(8->10)``: a built module, for the log."""
    if isinstance(module, nn.Conv2d):
        return (
            f"Conv2d({module.in_channels}->{module.out_channels}, kernel={tuple(module.kernel_size)}, "
            f"stride={tuple(module.stride)}, padding={tuple(module.padding)}, groups={module.groups})"
        )
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    return type(module).__name__
