"""A deploy form's architecture as declarative JSON: the folded ``torch.fx`` graph, without pickle or code.

:func:`describe` turns a :class:`torch.fx.GraphModule` into JSON values::

    {"kind": "fx-graph", "class_name": "DigitsNet",
     "modules": {"stage1.0.reparam": {"type": "Conv2d", "args": {"in_channels": 1, ...}}, ...},
     "attributes": {"scale": {"kind": "parameter"}},
     "nodes": [{"name": "x", "op": "placeholder", "target": "x", "args": [], "kwargs": {}},
               {"name": "conv", "op": "call_module", "target": "stage1.0.reparam",
                "args": [{"node": "x"}], "kwargs": {}}, ...,
               {"name": "output", "op": "output", "target": "output", "args": [{"node": "fc"}], "kwargs": {}}],
     "sha256": "..."}

Every ``call_module`` target is a module of :data:`MODULES` (``torch.nn`` types; ``Sequential``
holding them) with the constructor arguments read from the module; ``call_function`` targets come
from :data:`FUNCTIONS` (``operator``, ``torch`` and ``torch.nn.functional`` names) and
``call_method`` targets from :data:`METHODS`. Arguments are JSON values, with tagged objects for
what JSON lacks: ``{"node": name}``, ``{"tuple": [...]}``, ``{"slice": [a, b, c]}``,
``{"dtype": "float32"}``, ``{"float": "inf"}``, ``{"dict": [[key, value], ...]}``.

:func:`rebuild` validates every field against those tables (anything else is a
:class:`~trainfer.errors.BundleError` naming what was found and what is allowed; nothing outside
the tables is ever imported or called) and builds the module on the meta device: its weights come
from the bundle's safetensors file, loaded by the caller with ``assign=True``. ``sha256`` (of the
canonical JSON of the other fields) catches an edited or corrupted description; it is no signature:
whoever can write the manifest can write a matching digest, and still only allow-listed types and
functions are ever built or called.

The concepts live in their own modules; this one re-exports the documented names:
:mod:`~trainfer.serve.architecture_tables` (the allow-lists),
:mod:`~trainfer.serve.architecture_record` (:func:`describe`, :func:`digest`),
:mod:`~trainfer.serve.architecture_names` (the identifiers that may reach generated code),
:mod:`~trainfer.serve.architecture_rebuild` (:func:`rebuild`) and
:mod:`~trainfer.serve.computation_check` (:func:`check_computation`, the bounded meta-device run).
"""

from __future__ import annotations

from trainfer.serve.architecture_rebuild import rebuild
from trainfer.serve.architecture_record import describe, digest
from trainfer.serve.architecture_tables import FUNCTIONS, KIND, METHODS, MODULES
from trainfer.serve.computation_check import check_computation

__all__ = ["FUNCTIONS", "KIND", "METHODS", "MODULES", "check_computation", "describe", "digest", "rebuild"]
