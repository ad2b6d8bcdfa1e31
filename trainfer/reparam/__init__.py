"""Re-parameterization: the kernel algebra, the blocks built on it, and the automatic folder.

Bottom up: :mod:`~trainfer.reparam.algebra` (exact fusion math), :mod:`~trainfer.reparam.blocks`,
tracing and graph passes, the model zoos' own conversions (:mod:`~trainfer.reparam.protocols`),
:mod:`~trainfer.reparam.deploy` (copy, fold, verify) and :mod:`~trainfer.reparam.verify`.
Uses only the base modules (errors, numerics, opcount, capture, recipe).
"""
