"""Sequence models for digit strings ``(N, 1, 8, W)``: a CTC recogniser and an encoder-decoder.

Both read the string left to right with the same kind of conv encoder (conv-BN-ReLU blocks that
pool the height away and keep ``W / 2`` frames), and differ in the head:

* :class:`DigitStringCRNN`: a conv sequence head scores ``blank + 10 digits`` per frame; trained with
  CTC, plus an auxiliary CTC head on the encoder features used only in training
  (:func:`trainfer.train_only`); its inference form returns per-frame log-probabilities
  ``(N, T, 11)`` for :func:`trainfer.decoding.ctc_beam_search`.
* :class:`DigitStringSeq2Seq`: a GRU decoder with dot-product attention over the encoder frames,
  trained with teacher forcing; it implements :class:`trainfer.decoding.StepModel` (``encode``,
  ``step``) for :func:`trainfer.decoding.beam_search`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.errors import InputError
from trainfer.modes.dual import DualModule, train_only
from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of
from trainfer.reparam.algebra import ConvOp, fuse_bn

DIGITS = 10
CTC_TOKENS = ("",) + tuple(str(d) for d in range(DIGITS))
"""The CTC token table: id 0 is the blank, digit ``d`` is id ``d + 1``."""
SEQ_TOKENS = tuple(str(d) for d in range(DIGITS)) + ("<s>", "</s>")
"""The encoder-decoder's token table: digit ``d`` is id ``d``; BOS is 10, EOS (and pad) 11."""
BOS, EOS = 10, 11
MAX_FRAMES = 128
"""The encoder-decoder's position table: images up to 256 pixels wide."""


def _block(cin: int, cout: int, pool: tuple[int, int], deploy: bool = False) -> nn.Sequential:
    if deploy:  # the folded form: the BatchNorm lives in the conv's weight and bias
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(pool))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(pool))


class Encoder(nn.Module):
    """``(N, 1, 8, W)`` -> frames ``(N, width * 2, W / 2)``: height 8 -> 4 -> 2, width halved once.

    ``deploy=True`` builds the inference form: conv-ReLU-pool blocks (BN folded), no dropout.
    """

    def __init__(self, width: int = 32, dropout: float = 0.1, deploy: bool = False):
        super().__init__()
        first, second = _block(1, width // 2, (2, 2), deploy), _block(width // 2, width, (2, 1), deploy)
        self.blocks = nn.Sequential(first, second) if deploy else nn.Sequential(first, second, nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(x)  # (N, width, 2, W/2)
        return features.flatten(1, 2)


class DigitStringCRNN(DualModule):
    """Conv encoder, conv sequence head (Conv1d-BN-ReLU, Conv1d to 11 classes); an aux CTC head in training."""

    def __init__(self, width: int = 16, dropout: float = 0.1):
        super().__init__()
        classes = len(CTC_TOKENS)
        self.encoder = Encoder(width, dropout)
        self.head = nn.Sequential(
            nn.Conv1d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm1d(2 * width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv1d(2 * width, classes, 1),
        )
        self.aux_head = train_only(nn.Conv1d(2 * width, classes, 1))

    def forward_train(self, x: Tensor) -> dict[str, Tensor]:
        frames = self.encoder(x)
        return {
            "log_probs": F.log_softmax(self.head(frames).transpose(1, 2), dim=-1),
            "aux_log_probs": F.log_softmax(self.aux_head(frames).transpose(1, 2), dim=-1),
        }

    def forward_infer(self, x: Tensor) -> Tensor:
        # F.log_softmax, not the tensor method: a deploy bundle's architecture allow-lists the function
        return F.log_softmax(self.head(self.encoder(x)).transpose(1, 2), dim=-1)


class DigitStringSeq2Seq(nn.Module):
    """Conv encoder; GRU decoder with dot-product attention over the frames (a StepModel).

    ``forward(x, targets_in)`` is teacher forcing: ``(N, L)`` previous tokens (BOS first) to ``(N, L, 12)``
    next-token log-probs. ``encode``/``step`` serve the searches. The state ``(h, memory, context)`` has
    the R rows (items x beams) first in ``h`` and ``context``, but ``memory`` (the encoder frames)
    keeps one entry per ITEM, ``(N, T, hidden)`` with ``R = N * beams``: row ``r`` attends to item
    ``r // beams``, so :meth:`reorder_state` leaves it alone while beams move within their items.
    ``deploy=True`` builds the inference form (:func:`deploy_seq2seq`: the encoder's BN folded, no dropout).
    """

    def __init__(self, width: int = 16, hidden: int = 48, dropout: float = 0.1, deploy: bool = False):
        super().__init__()
        self.encoder: nn.Module = Encoder(width, dropout, deploy)
        self.project = nn.Linear(2 * width, hidden)
        self.position = nn.Embedding(MAX_FRAMES, hidden)  # attention by content alone cannot tell digits apart
        self.embed = nn.Embedding(len(SEQ_TOKENS), hidden)
        self.cell = nn.GRUCell(2 * hidden, hidden)
        self.out = nn.Linear(2 * hidden, len(SEQ_TOKENS))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        memory = self.project(self.encoder(x).transpose(1, 2))  # (N, T, hidden)
        memory = memory + self.position(torch.arange(memory.shape[1], device=memory.device))
        h = memory.mean(dim=1)
        return h, memory, torch.zeros_like(h)

    def step(
        self, state: tuple[Tensor, Tensor, Tensor], tokens: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        h, memory, context = state
        h = self.cell(torch.cat([self.embed(tokens), context], dim=1), h)
        items, frames, width = memory.shape
        grouped = memory[:, None]  # (N, 1, T, hidden): broadcast over each item's beams, never copied per row
        scores = (grouped @ h.view(items, -1, width, 1)).view(h.shape[0], frames)
        weights = torch.softmax(scores / width**0.5, dim=1)
        context = (weights.view(items, -1, frames, 1) * grouped).sum(dim=2).view(h.shape)
        return self.out(torch.cat([h, context], dim=1)).log_softmax(-1), (h, memory, context)

    def reorder_state(self, state: tuple[Tensor, Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The state of rows ``index`` (see :func:`trainfer.decoding.reorder_state`), ``memory`` per item.

        When every new row ``r`` comes from the item ``r // beams`` (new beams), as the searches'
        reorders always do, ``memory`` is returned as is; otherwise it is indexed to one entry per new
        row (each row its own item). Either way each row attends to the same frames as under a
        generic reorder of a per-row memory.
        """
        h, memory, context = state
        items, rows = memory.shape[0], index.shape[0]
        item = index.div(h.shape[0] // items, rounding_mode="floor")  # each new row's item
        grouped = torch.arange(items, device=item.device).repeat_interleave(rows // items)  # r // new beams
        if rows % items or not torch.equal(item, grouped):
            memory = memory.index_select(0, item)
        return h.index_select(0, index), memory, context.index_select(0, index)

    def forward(self, x: Tensor, targets_in: Tensor) -> Tensor:
        state = self.encode(x)
        steps = []
        for t in range(targets_in.shape[1]):
            log_probs, state = self.step(state, targets_in[:, t])
            steps.append(log_probs)
        return torch.stack(steps, dim=1)


def deploy_seq2seq(model: DigitStringSeq2Seq) -> DigitStringSeq2Seq:
    """The inference form of a trained encoder-decoder: a new ``deploy=True`` model, ``model`` untouched.

    Each encoder conv followed by BatchNorm (eval statistics) becomes one conv
    (:func:`trainfer.reparam.algebra.fuse_bn`: ``W' = s W``, ``b' = s b + t`` with the BN's
    ``y = s x + t``); dropout goes; the decoder's weights are copied as they are. Its recipe says
    ``deploy=True`` and ``form="deploy"``, so a bundle's factory call rebuilds this form.
    Check it against ``model`` with :func:`trainfer.verify` on ``encode`` (see the sequence demo).
    """
    recipe = recipe_of(model)
    config = dict(recipe.config) if recipe is not None else {}
    config["deploy"] = True
    folded = DigitStringSeq2Seq(**config).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    missing = folded.load_state_dict(state, strict=False).missing_keys
    if any(not key.startswith("encoder.") for key in missing):
        raise InputError(f"the deploy form needs every decoder weight of the trained model; missing: {missing}")
    trained, inference = cast(nn.Sequential, model.encoder.blocks), cast(nn.Sequential, folded.encoder.blocks)
    for index in range(len(inference)):  # the conv blocks (the trained form's dropout follows them)
        source, target = cast(nn.Sequential, trained[index]), cast(nn.Sequential, inference[index])
        conv, bn = cast(nn.Conv2d, source[0]), cast(nn.BatchNorm2d, source[1])
        op, out = fuse_bn(ConvOp.from_module(conv), bn), cast(nn.Conv2d, target[0])
        with torch.no_grad():
            out.weight.copy_(op.weight)
            cast(Tensor, out.bias).copy_(op.bias)
    if recipe is not None:
        attach_recipe(folded, dataclasses.replace(recipe, config=config, form="deploy"))
    return folded.eval()


def digit_string_crnn(**options: Any) -> DigitStringCRNN:
    """A :class:`DigitStringCRNN` (``width``, ``dropout``) for ``(N, 1, 8, 64)`` strings."""
    return attach_recipe(
        DigitStringCRNN(**options), ModelRecipe("trainfer.models:digit_string_crnn", dict(options), (1, 1, 8, 64))
    )


def digit_string_seq2seq(**options: Any) -> DigitStringSeq2Seq:
    """A :class:`DigitStringSeq2Seq` (``width``, ``hidden``, ``dropout``, ``deploy``)."""
    return attach_recipe(
        DigitStringSeq2Seq(**options), ModelRecipe("trainfer.models:digit_string_seq2seq", dict(options), (1, 1, 8, 64))
    )
