"""Looking inside a model: per-layer records in both modes, the mode-risk audit, attributions.

:mod:`~trainfer.analysis.inspection` (``trainfer.inspect``), :mod:`~trainfer.analysis.audit`
(``trainfer.audit``) and :mod:`~trainfer.analysis.attribution` (Captum, imported on use).
"""
