"""The embedded digits data set: a fixed split, one preprocessing shared by tensors and images.

scikit-learn ships the UCI digits (1,797 grayscale 8x8 images, 10 classes) inside the wheel, so the
demo needs no download. A raw digit pixel ``v`` in ``0..16`` is first quantised to an 8-bit pixel,
exactly as it is stored in a PNG file, then scaled and normalised:

    p = round(v * 255 / 16)            (uint8, what :func:`save_png` writes)
    x = (p / 255 - mean) / std         (float32, what the model sees)

with ``mean`` and ``std`` measured once on the training split. Because the tensor path goes through
the same 8-bit pixel a PNG holds, an image file read back with :data:`PREPROCESS` gives the very
tensor the model was trained on. Augmentation (random shifts by up to one pixel, zero fill) runs in
the training loader only, and draws from ``(seed, epoch)`` so an epoch can be replayed exactly.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from trainfer.atomic import atomic_file
from trainfer.errors import InputError
from trainfer.serve import distributed

#: Seed of the train/validation/test split: fixed, so every run and every rank sees the same split.
SPLIT_SEED = 0
#: Samples per held-out split (validation and test each); the training split gets the rest (1,257).
HELD_OUT = 270
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
LABELS = [str(digit) for digit in range(NUM_CLASSES)]
_RAW_MAX = 16
PIXEL_SCALE = 1 / 255


@dataclass(frozen=True)
class Split:
    """One split: 8-bit pixels ``(N, 1, 8, 8)`` uint8, labels ``(N,)`` int64, and each sample's
    ``indices`` into scikit-learn's ``load_digits()``."""

    pixels: Tensor
    labels: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> Split:
        """The first ``count`` samples (all when ``None``); the split is already shuffled."""
        if count is None:
            return self
        if count <= 0:
            raise InputError(f"subset must be a positive number of samples; got {count}")
        return Split(self.pixels[:count], self.labels[:count], self.indices[:count])


@functools.cache
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / _RAW_MAX)).astype(np.uint8)[:, None]
    return pixels, bunch.target.astype(np.int64)


@functools.cache
def splits() -> dict[str, Split]:
    """The fixed, stratified ``{"train", "val", "test"}`` split (disjoint, same on every call)."""
    from sklearn.model_selection import train_test_split

    pixels, labels = _raw()
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=HELD_OUT, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=HELD_OUT, stratify=labels[rest], random_state=SPLIT_SEED)
    return {
        name: Split(torch.from_numpy(pixels[part]), torch.from_numpy(labels[part]), torch.from_numpy(part))
        for name, part in (("train", train), ("val", val), ("test", test))
    }


@functools.cache
def _statistics() -> tuple[float, float]:
    """Mean and (sample) standard deviation of the training pixels scaled to [0, 1].

    Computed from exact integer sums, so the values do not depend on thread count or summation order.
    """
    pixels = splits()["train"].pixels.long()
    count, total, squares = pixels.numel(), int(pixels.sum()), int((pixels * pixels).sum())
    variance = Fraction(squares * count - total * total, count * (count - 1) * 255**2)
    return float(Fraction(total, count * 255)), math.sqrt(variance)


def preprocess_spec() -> dict[str, object]:
    """The preprocessing a bundle records (``trainfer.serve.preprocess.PreprocessSpec`` fields):
    a grayscale ``1 x 8 x 8`` image, ``x = (pixel * pixel_scale - mean) / std``; larger images are
    box-filtered down, so a digit enlarged by an integer factor (``save_png(upscale=k)``) maps back exactly."""
    mean, std = _statistics()
    return {
        "input_shape": list(INPUT_SHAPE),
        "pixel_scale": PIXEL_SCALE,
        "mean": [mean],
        "std": [std],
        "resample": "box",
    }


def normalize(pixels: Tensor) -> Tensor:
    """8-bit pixels (any shape) -> the float32 model input ``(pixels * pixel_scale - mean) / std``.

    The same float32 operations, in the same order, as an image file read through the spec.
    """
    mean, std = _statistics()
    return (pixels.float() * PIXEL_SCALE - mean) / std


def shift(pixels: Tensor, offsets: Tensor) -> Tensor:
    """Shift each image ``(N, C, H, W)`` by its ``offsets[n] = (dy, dx)`` in ``{-1, 0, 1}``, zero fill."""
    if offsets.abs().max() > 1:
        raise InputError(f"offsets must lie in {{-1, 0, 1}}; got max |offset| {int(offsets.abs().max())}")
    height, width = pixels.shape[-2:]
    padded = F.pad(pixels, (1, 1, 1, 1))
    return torch.stack(
        [padded[n, :, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width] for n, (dy, dx) in enumerate(offsets.tolist())]
    )


class DigitsDataset(Dataset):
    """Normalised digits; with ``augment`` each sample is shifted by a draw fixed per ``(seed, epoch)``."""

    def __init__(self, split: Split, augment: bool = False, seed: int = 0):
        self.split, self.augment, self.seed = split, augment, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's shifts; the same ``(seed, epoch)`` always gives the same shifts."""
        pixels = self.split.pixels
        if self.augment:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            pixels = shift(pixels, torch.randint(-1, 2, (len(pixels), 2), generator=generator))
        self._inputs = normalize(pixels)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._inputs[index], self.split.labels[index]


@dataclass(frozen=True)
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader


def loaders(batch_size: int = 64, seed: int = 0, subset: int | None = None, eval_batch_size: int = 256) -> Loaders:
    """DataLoaders over the fixed split; ``subset`` keeps the first N training samples.

    The training loader shuffles with a :class:`DistributedSampler` (one replica outside torchrun),
    so ``set_epoch`` reshuffles reproducibly; evaluation loaders give each rank a disjoint shard.
    """
    parts = splits()
    dataset = DigitsDataset(parts["train"].head(subset), augment=True, seed=seed)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, distributed.world_size(), distributed.rank(), shuffle=True, seed=seed
    )
    train = DataLoader(dataset, batch_size, sampler=sampler)
    return Loaders(train, _eval_loader(parts["val"], eval_batch_size), _eval_loader(parts["test"], eval_batch_size))


def _eval_loader(split: Split, batch_size: int) -> DataLoader:
    dataset = DigitsDataset(split)
    return DataLoader(dataset, batch_size, sampler=list(distributed.shard_indices(len(dataset))))


def save_png(pixels: Tensor, path: str | os.PathLike, upscale: int = 8) -> Path:
    """Write one ``(1, 8, 8)`` uint8 digit as a grayscale PNG enlarged ``upscale`` times (nearest).

    Each source pixel becomes an ``upscale x upscale`` block, so a box (or nearest) reduction
    recovers the 8-bit pixels exactly; ``upscale=1`` needs no resizing at all. Written atomically.
    """
    from PIL import Image

    if pixels.dtype != torch.uint8 or tuple(pixels.shape) != INPUT_SHAPE:
        raise InputError(f"expected uint8 pixels of shape {INPUT_SHAPE}; got {pixels.dtype} {tuple(pixels.shape)}")
    image = Image.fromarray(pixels[0].numpy())
    image = image.resize((INPUT_SHAPE[2] * upscale, INPUT_SHAPE[1] * upscale), Image.Resampling.NEAREST)
    path = Path(path)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
