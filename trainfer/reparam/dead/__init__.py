"""Exact removal of dead channels from a folded deploy form (``trainfer.deploy(..., prune_dead=True)``).

A channel is *dead* where what it carries is provably a constant (a conv filter of zero weights:
its bias; a BatchNorm with gamma = 0: its beta; a ReLU whose input is provably never positive: 0)
or provably unused (every consumer's weights on it are zero). Such a channel is removed from
every layer it runs through and its constant is folded into the next layers' biases.

Modules: ``graph`` (what each fx node does to channels), ``bounds`` (per-channel interval bounds,
the proof of constancy), ``remove`` (channel classes, the decision, the rewrite and its report).
"""

from __future__ import annotations

from trainfer.reparam.dead.remove import DeadChannelReport, remove_dead_channels

__all__ = ["DeadChannelReport", "remove_dead_channels"]
