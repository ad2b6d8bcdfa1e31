"""How a model factory records itself, so that a bundle can rebuild the same model later."""

from __future__ import annotations

from typing import Any

from torch import nn


def record_config(model: nn.Module, factory: str, config: dict[str, Any], input_shape: list[int]) -> nn.Module:
    """Attach ``model.trainfer_config = {"factory", "config", "input_shape"}`` and return the model.

    ``factory`` is ``"package.module:function"`` and ``function(**config)`` rebuilds the model
    (``config`` holds JSON values only); ``input_shape`` is an example input shape with batch 1.
    """
    model.trainfer_config = {"factory": factory, "config": dict(config), "input_shape": list(input_shape)}
    return model
