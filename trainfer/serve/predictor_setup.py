"""What a Predictor is set up with: its model placed on a device, the preprocessing spec completed
from the model, recorded heads as constructor settings, and the sequence task's decoder."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainfer.errors import InputError
from trainfer.recipe import recipe_of
from trainfer.serve.heads import Head
from trainfer.serve.preprocess import PreprocessSpec


def head_settings(heads: list[Head]) -> dict[str, Any]:
    """Recorded heads as constructor arguments (so that some of them can be overridden)."""
    kinds = {h.name: h.kind.kind for h in heads if h.kind is not None}
    if heads[0].name is None:
        head = heads[0]
        return {"task": head.task, "labels": head.labels, "output": head.select, "output_kind": kinds.get(None)}
    return {
        "heads": {h.name: h.task for h in heads},
        "labels": {h.name: h.labels for h in heads if h.labels is not None},
        "output_kind": kinds,
    }


def decoder_for(heads: list[Head], decoder: Any) -> Any:
    """The sequence task's decoder settings (None for other tasks); one sequence head, not several."""
    if not any(head.task == "sequence" for head in heads):
        return None
    if len(heads) > 1:
        raise InputError("a sequence head is served alone: multi-head predictors with one are not supported")
    from trainfer.serve.sequence import DecoderSettings

    settings = DecoderSettings.coerce(decoder)
    settings.table(heads[0].labels)
    return settings


def autoregressive(decoder: Any) -> bool:
    from trainfer.serve.sequence import is_autoregressive

    return is_autoregressive(decoder)


def generates(decoder: Any, cache_size: int, runtime: Any) -> bool:
    """Whether the predictor decodes an autoregressive model; what does not apply to one is refused."""
    if decoder is None or not autoregressive(decoder):
        return False
    for name, value in (("cache_size", cache_size), ("runtime", runtime)):
        if value:
            raise InputError(
                f"{name} does not apply to an autoregressive sequence model: its decoding calls "
                "encode() and step() per token, not one forward per batch"
            )
    return True


def placed(model: Any, device: torch.device) -> Any:
    """``model`` itself on ``device``, or a copy moved there (ours: put in eval for good)."""
    if not isinstance(model, nn.Module):
        return model
    current = next((t.device for t in [*model.parameters(), *model.buffers()]), device)
    return model if current == device else copy.deepcopy(model).to(device).eval()


def spec_for(model: Any, preprocess: Any) -> PreprocessSpec:
    """The given spec (or an empty one), completed by the model's input shape and parameter dtype."""
    shape = getattr(recipe_of(model), "input_shape", None)
    spec = PreprocessSpec.coerce(preprocess, input_shape=tuple(shape[1:]) if shape else None)
    if not isinstance(model, nn.Module):
        return spec
    return spec.with_dtype(next((p.dtype for p in model.parameters() if p.is_floating_point()), None))
