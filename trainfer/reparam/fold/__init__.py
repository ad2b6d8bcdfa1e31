"""The automatic folder: rewrite every maximal linear region of a model as one convolution.

The pass works on a ``torch.fx`` trace of the model in eval mode, so ``if self.training``
branches, ``forward_infer`` and ``train_only`` modules have already resolved to the inference path.

A node is *linear* when its output is an affine function ``op(anchor)`` of one upstream tensor,
its *anchor*, with ``op`` a :class:`trainfer.reparam.algebra.ConvOp`. Which calls are linear, and
how, is a table of handlers keyed by call target (:mod:`~trainfer.reparam.fold.builtin`):
convolutions and linears with constant weights (modules or ``F.conv2d``/``F.linear`` on
parameters), BatchNorm in eval mode (any ``_BatchNorm`` subclass, or ``F.batch_norm``), sums and
differences of branches of the same anchor (``+``, ``torch.add``, ``sum([...])``), multiplication
by a constant scalar or per-channel tensor (layer scale), zero padding, average pooling and
symmetric crops, and a pad whose border item assignments fill with the bias before it (DBB's
``BNAndPad``). A call passes its own extra entries (``fold(..., handlers=FoldHandlers.default({...}))``,
``trainfer.deploy(..., handlers={...})``); :func:`register_fold_handler` adds to every call's
default. Operators compose through the algebra:
``sequential`` for a chain, ``add`` for branches, ``channel_affine`` for BatchNorm and scales. A
chain stops (its last node becomes a *region root*) where the value feeds a non-linear node, has
several consumers, or where the algebra says a further step is not exact (it raises
:class:`~trainfer.reparam.algebra.AlgebraError`) or would cost more (multiply-adds plus weight
elements, :mod:`~trainfer.reparam.fold.cost`) than the unfused ops. Every root whose region holds
two or more ops becomes one ``nn.Conv2d`` (4-D values) or ``nn.Linear`` (2-D values) reading the
anchor, or, when the region is only a per-channel affine without a conv or linear member, one
:class:`~trainfer.reparam.fold.rewrite.ChannelAffine` (``addcmul``); dead nodes, and the modules
and parameters only they used, disappear; constants computed from parameters that remain are
stored once (:func:`~trainfer.reparam.fold.constants.precompute`).

A BatchNorm left alone between two non-linearities stays a BatchNorm: in eval mode it is one
per-channel affine kernel, cheaper than the depthwise 1x1 convolution it could become.

When a submodule's ``forward`` cannot be traced (item assignment, data-dependent control flow),
it stays one opaque op of its parent's graph (:mod:`~trainfer.reparam.fold.trace`), which is
folded around it; the opaque module is listed under "not folded" and its own insides are folded
separately. When a module's own ``forward`` cannot be traced, :func:`fold` folds each of its
children separately (:mod:`~trainfer.reparam.fold.driver`). The module-level protocols models
carry (``reparameterize()``, ``switch_to_deploy()``, ``fuse()``) run before, in
:mod:`trainfer.reparam.protocols`.

Modules: ``driver`` (entry point, fallbacks, the pass's order), ``trace`` (the tracer policy),
``passes`` (eval no-ops, padding modes, rank checks, head batch norms; they recognise ops through
the handler table too), ``shapes``, ``calls`` (argument binding with torch's own signatures),
``constants`` (constant evaluation), ``linearity`` (``NotLinear``, the one way a handler
declines), ``handlers`` (the table) and ``builtin`` (its entries), ``recognize`` (walking the
graph), ``regions`` (the read-only graph, the per-round state, the handlers' context), ``cost``
(the cost model), ``rewrite`` and ``naming``, ``log``. The tracer is :func:`trainfer.reparam.fold.trace.trace`
(not re-exported here, where the name is the module's).
"""

from __future__ import annotations

from trainfer.reparam.fold.builtin import Handler
from trainfer.reparam.fold.driver import fold
from trainfer.reparam.fold.handlers import FoldHandlers, fold_handlers, register_fold_handler, unregister_fold_handler
from trainfer.reparam.fold.linearity import NotLinear
from trainfer.reparam.fold.log import FoldedRegion, FoldLog
from trainfer.reparam.fold.regions import Expr, FoldContext

__all__ = [
    "Expr",
    "FoldContext",
    "FoldHandlers",
    "FoldLog",
    "FoldedRegion",
    "Handler",
    "NotLinear",
    "fold",
    "fold_handlers",
    "register_fold_handler",
    "unregister_fold_handler",
]
