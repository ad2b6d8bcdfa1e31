"""Digit strings from the embedded digits: 3 to 6 digits side by side with varied spacing (no download).

Each string image is one row of 8x8 digits pasted on a blank canvas of ``1 x 8 x WIDTH`` 8-bit
pixels, with a random gap of 0 to 2 pixels between digits and a random left margin. Training strings
use digits of the training split only, held-out strings digits of the test split, so a held-out
string never shows a digit image seen in training. The images are normalised exactly like single
digits (:func:`trainfer.demo.data.normalize`), and :func:`preprocess_spec` records that preprocessing
for the bundles, so a PNG of the 8-bit pixels (or the pixels over 255 in a ``.npy``) read through it
gives the very tensor the models were trained on.

Targets are the digit values, padded with -1 after each string's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainfer.demo.data import Split, normalize, splits
from trainfer.demo.data import preprocess_spec as digit_preprocess_spec
from trainfer.errors import InputError

WIDTH = 64
"""Canvas width in pixels: 6 digits of 8 with 5 gaps of up to 2 pixels fit, with a margin."""
MIN_DIGITS, MAX_DIGITS, MAX_GAP = 3, 6, 2


@dataclass(frozen=True)
class DigitStrings:
    """``images`` ``(N, 1, 8, WIDTH)`` float32 (normalised), ``pixels`` the same as uint8,
    ``targets`` ``(N, MAX_DIGITS)`` int64 digit values padded with -1, ``lengths`` ``(N,)``."""

    images: Tensor
    pixels: Tensor
    targets: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return len(self.images)

    def strings(self) -> list[str]:
        """The target strings, e.g. ``"4071"``."""
        return ["".join(str(d) for d in row[:n]) for row, n in zip(self.targets.tolist(), self.lengths.tolist())]


def compose(split: Split, count: int, seed: int) -> DigitStrings:
    """``count`` random digit strings made of ``split``'s digit images (deterministic in ``seed``)."""
    if count < 1:
        raise InputError(f"count must be a positive number of strings; got {count}")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_DIGITS, MAX_DIGITS + 1, (count,), generator=gen)
    present = torch.arange(MAX_DIGITS) < lengths[:, None]  # (N, MAX_DIGITS): slot k holds a digit
    picks = torch.randint(0, len(split.labels), (count, MAX_DIGITS), generator=gen)
    gaps = torch.randint(0, MAX_GAP + 1, (count, MAX_DIGITS), generator=gen) * present
    gaps[:, 0] = 0
    used = 8 * lengths + gaps.sum(1)
    margin = (torch.rand(count, generator=gen) * (WIDTH - used + 1)).long()  # uniform in 0 .. WIDTH - used
    starts = margin[:, None] + gaps.cumsum(1) + 8 * torch.arange(MAX_DIGITS)  # left column of slot k
    pixels = torch.zeros(count, 8, WIDTH, dtype=torch.uint8)
    strings, slots = present.nonzero(as_tuple=True)
    columns = starts[strings, slots][:, None, None] + torch.arange(8)  # (M, 1, 8)
    pixels[strings[:, None, None], torch.arange(8)[:, None], columns] = split.pixels[picks[strings, slots], 0]
    pixels = pixels[:, None]
    targets = torch.where(present, split.labels[picks], -1)
    return DigitStrings(normalize(pixels), pixels, targets, lengths)


def preprocess_spec() -> dict[str, object]:
    """The preprocessing a digit-string bundle records: the digits' (:func:`trainfer.demo.data.preprocess_spec`,
    ``x = (pixel * pixel_scale - mean) / std``) on a grayscale ``1 x 8 x WIDTH`` image."""
    return {**digit_preprocess_spec(), "input_shape": [1, 8, WIDTH]}


def digit_strings(part: str, count: int, seed: int = 0) -> DigitStrings:
    """Strings of the ``"train"``, ``"val"`` or ``"test"`` split's digits."""
    return compose(splits()[part], count, seed)
