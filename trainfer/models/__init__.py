"""Model families built from trainfer's blocks; every factory attaches a :class:`~trainfer.recipe.ModelRecipe`."""

from __future__ import annotations

import dataclasses

from torch import nn

from trainfer.models.digits import DigitsNet, digits_net
from trainfer.models.mobileone import MobileOne, mobileone_s0
from trainfer.models.repvgg import RepVGG, repvgg_a0, repvgg_a1, repvgg_a2, repvgg_b0
from trainfer.models.sequence import digit_string_crnn, digit_string_seq2seq
from trainfer.recipe import attach_recipe, recipe_of
from trainfer.registry import register_model
from trainfer.reparam.blocks import ReparamBlock

#: Every built-in model factory by name (``trainfer bench --model repvgg_a0``).
FACTORIES = {
    factory.__name__: factory for factory in (repvgg_a0, repvgg_a1, repvgg_a2, repvgg_b0, mobileone_s0, digits_net)
}
for _sequence_factory in (digit_string_crnn, digit_string_seq2seq):  # bundles name them; bench does not
    register_model(_sequence_factory, name=f"trainfer.models:{_sequence_factory.__name__}")
for _factory in FACTORIES.values():  # bundles name them as trainfer.models:NAME (see trainfer.registry)
    register_model(_factory, name=f"trainfer.models:{_factory.__name__}")

__all__ = [
    "FACTORIES",
    "DigitsNet",
    "MobileOne",
    "RepVGG",
    "digit_string_crnn",
    "digit_string_seq2seq",
    "digits_net",
    "mobileone_s0",
    "reparameterize",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
]


def reparameterize(model: nn.Module) -> nn.Module:
    """Turn every :class:`~trainfer.reparam.blocks.ReparamBlock` in ``model`` into its one-conv form, in place.

    Returns ``model``. Idempotent. Where the model has a recipe (:func:`trainfer.recipe.recipe_of`),
    it gets a new one whose config says ``deploy=True``, so the recorded factory call rebuilds this
    form (for bundles).
    """
    for block in [module for module in model.modules() if isinstance(module, ReparamBlock)]:
        block.reparameterize()
    recipe = recipe_of(model)
    if recipe is not None:
        attach_recipe(model, dataclasses.replace(recipe, config={**recipe.config, "deploy": True}))
    return model
