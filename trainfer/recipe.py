"""A model's recipe: how to rebuild it (factory, config, input shape, form), for bundles and serving.

:class:`ModelRecipe` is one immutable record: trainfer's model factories attach it, ``trainfer.deploy``
and ``trainfer.load`` attach an updated one (``dataclasses.replace``), and everything that needs it
(bundles, runtimes, the CLI) reads it through :func:`recipe_of`. :func:`attach_recipe` is the only
writer; a recipe is never mutated in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from trainfer.errors import InputError, InputTypeError

__all__ = ["ModelRecipe", "attach_recipe", "model_form", "recipe_of"]

#: The attribute a recipe lives under (read and written only here).
_ATTRIBUTE = "trainfer_recipe"
FORMS = ("train", "deploy")


@dataclass(frozen=True)
class ModelRecipe:
    """How to rebuild a model: ``factory(**config)``, in ``form``, run on inputs of ``input_shape``.

    ``factory`` is ``"package.module:function"`` (``None`` when unknown: the recipe then records only the
    input shape and form, and a bundle needs a factory given to ``save``); ``config`` holds JSON values only
    (numbers, strings, booleans, null, lists, dicts); ``input_shape`` is an example input shape with batch
    dimension (or ``None`` when unknown); ``form`` is ``"train"`` or ``"deploy"``, and ``deploy_options`` the
    keyword options ``trainfer.deploy`` ran with (JSON values, ``{}`` for a training form). Construction
    validates every field (:class:`~trainfer.errors.InputError` or :class:`~trainfer.errors.InputTypeError`)
    and copies ``config``/``deploy_options``, so a recipe shares no mutable state with its caller. Derive
    changed recipes with ``dataclasses.replace``.
    """

    factory: str | None
    config: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    form: Literal["train", "deploy"] = "train"
    deploy_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.factory is not None and (not isinstance(self.factory, str) or not self.factory):
            raise InputError(
                f"ModelRecipe.factory must name a factory ('package.module:function' or a registered name); "
                f"got {self.factory!r}"
            )
        if self.form not in FORMS:
            raise InputError(f"ModelRecipe.form must be one of {list(FORMS)}; got {self.form!r}")
        object.__setattr__(self, "config", _json_copy(self.config, "config"))
        object.__setattr__(self, "deploy_options", _json_copy(self.deploy_options, "deploy_options"))
        object.__setattr__(self, "input_shape", _shape(self.input_shape))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON values (``input_shape`` as a list), the fields a bundle manifest holds."""
        shape = list(self.input_shape) if self.input_shape is not None else None
        return {
            "factory": self.factory,
            "config": _json_copy(self.config, "config"),
            "input_shape": shape,
            "form": self.form,
            "deploy_options": _json_copy(self.deploy_options, "deploy_options"),
        }


def _json_copy(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputTypeError(f"ModelRecipe.{what} must be a dict of JSON values; got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InputError(
            f"ModelRecipe.{what} must hold JSON values only (numbers, strings, lists, dicts): {error}"
        ) from None


def _shape(shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if not isinstance(shape, list | tuple) or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in shape
    ):
        raise InputError(f"ModelRecipe.input_shape must be a sequence of positive ints or None; got {shape!r}")
    return tuple(shape)


def recipe_of(model: Any) -> ModelRecipe | None:
    """The recipe attached to ``model`` (any object: a module, a compiled model), or ``None``."""
    recipe = getattr(model, _ATTRIBUTE, None)
    return recipe if isinstance(recipe, ModelRecipe) else None


def model_form(model: Any) -> Literal["train", "deploy"]:
    """``"deploy"`` for a deploy form (its recipe says so, or it carries the report ``trainfer.deploy``
    attaches), else ``"train"``: the one test of which form a model is."""
    recipe = recipe_of(model)
    deployed = (recipe is not None and recipe.form == "deploy") or hasattr(model, "trainfer_report")
    return "deploy" if deployed else "train"


def attach_recipe(model: Any, recipe: ModelRecipe | None) -> Any:
    """Attach ``recipe`` to ``model`` (replacing any previous one; ``None`` removes it); returns ``model``.

    The only writer of recipes: the model object gets the attribute, nothing else changes.
    """
    if recipe is not None and not isinstance(recipe, ModelRecipe):
        raise InputTypeError(f"attach_recipe needs a ModelRecipe or None; got {type(recipe).__name__}")
    if recipe is None:
        if _ATTRIBUTE in vars(model):
            delattr(model, _ATTRIBUTE)
    else:
        setattr(model, _ATTRIBUTE, recipe)
    return model
