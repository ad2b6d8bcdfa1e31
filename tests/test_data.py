import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainfer.demo import data


def test_split_is_fixed_disjoint_stratified_and_complete():
    parts = data.splits()
    assert {name: len(part) for name, part in parts.items()} == {"train": 1257, "val": 270, "test": 270}
    indices = [set(part.indices.tolist()) for part in parts.values()]
    assert sum(map(len, indices)) == 1797
    assert set().union(*indices) == set(range(1797))
    for part in parts.values():
        assert part.pixels.shape == (len(part), 1, 8, 8) and part.pixels.dtype == torch.uint8
        assert torch.bincount(part.labels, minlength=10).min() >= 20  # every class in every split

    data.splits.cache_clear()
    again = data.splits()
    for name, part in parts.items():
        assert torch.equal(again[name].indices, part.indices)
        assert torch.equal(again[name].pixels, part.pixels)


def test_pixels_match_scikit_learn_through_8_bit_quantisation():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    test = data.splits()["test"]
    expected = np.rint(raw[test.indices.numpy()] * 255 / 16)
    assert np.array_equal(test.pixels[:, 0].numpy(), expected)


def test_normalisation_is_standard_on_the_training_split():
    inputs = data.normalize(data.splits()["train"].pixels)
    assert inputs.dtype == torch.float32
    assert abs(float(inputs.mean())) < 1e-5 and abs(float(inputs.std()) - 1) < 1e-4
    spec = data.preprocess_spec()
    assert spec["input_shape"] == [1, 8, 8]
    pixels = torch.tensor([0, 255], dtype=torch.uint8)
    manual = (pixels.double() * spec["pixel_scale"] - spec["mean"][0]) / spec["std"][0]
    torch.testing.assert_close(data.normalize(pixels).double(), manual, rtol=1e-6, atol=1e-6)


def test_shift_moves_content_and_fills_zeros():
    image = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3)
    down_right = data.shift(image, torch.tensor([[1, 1]]))
    assert down_right[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    up_left = data.shift(image, torch.tensor([[-1, -1]]))
    assert up_left[0, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    assert torch.equal(data.shift(image, torch.tensor([[0, 0]])), image)
    with pytest.raises(ValueError, match="offsets"):
        data.shift(image, torch.tensor([[2, 0]]))


def _all_shifts(pixels):
    return [
        data.normalize(data.shift(pixels[None], torch.tensor([[dy, dx]])))[0] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]


def test_augmentation_only_in_training_and_replayable_per_epoch():
    loaders = data.loaders(subset=64)
    train, val, test = loaders.train.dataset, loaders.val.dataset, loaders.test.dataset
    for dataset in (val, test):
        inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert torch.equal(inputs, data.normalize(dataset.split.pixels))

    train.set_epoch(3)
    epoch3 = torch.stack([train[i][0] for i in range(len(train))])
    clean = data.normalize(train.split.pixels)
    moved = (epoch3 != clean).flatten(1).any(1)
    assert 0.6 < float(moved.float().mean()) < 0.99  # 8 of 9 offsets move a digit
    for i in range(len(train)):
        assert any(torch.equal(epoch3[i], candidate) for candidate in _all_shifts(train.split.pixels[i]))

    train.set_epoch(4)
    assert not torch.equal(torch.stack([train[i][0] for i in range(len(train))]), epoch3)
    train.set_epoch(3)
    assert torch.equal(torch.stack([train[i][0] for i in range(len(train))]), epoch3)


def test_training_loader_reshuffles_per_epoch_and_subsets():
    loader = data.loaders(batch_size=16, subset=100).train
    assert len(loader.dataset) == 100 and len(loader) == 7

    def order(epoch):
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(0) == order(0) != order(1)
    assert sorted(order(1)) == list(range(100))
    with pytest.raises(ValueError, match="subset"):
        data.loaders(subset=0)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), upscale=st.integers(1, 12))
def test_png_round_trip_is_exact_with_a_box_reduction(tmp_path_factory, seed, upscale):
    pixels = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path = data.save_png(pixels, tmp_path_factory.mktemp("png") / "digit.png", upscale=upscale)
    with Image.open(path) as image:
        assert image.size == (8 * upscale, 8 * upscale) and image.mode == "L"
        reduced = image.resize((8, 8), Image.Resampling.BOX)
    assert np.array_equal(np.asarray(reduced), pixels[0].numpy())


def test_save_png_rejects_wrong_input(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 pixels of shape \(1, 8, 8\); got torch.float32"):
        data.save_png(torch.zeros(1, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"got torch.uint8 \(8, 8\)"):
        data.save_png(torch.zeros(8, 8, dtype=torch.uint8), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("upscale", [1, 4])
def test_png_read_through_the_bundle_spec_gives_the_training_tensor_exactly(tmp_path, upscale):
    """Native 8x8 PNGs and enlarged ones (the spec box-filters them back) give the training input."""
    from trainfer.serve.inputs import gather
    from trainfer.serve.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(data.preprocess_spec())
    test = data.splits()["test"].head(12)
    paths = [data.save_png(pixels, tmp_path / f"{i}.png", upscale=upscale) for i, pixels in enumerate(test.pixels)]
    assert torch.equal(spec.prepare(gather(paths, spec)), data.normalize(test.pixels))


def test_statistics_are_exact_and_thread_independent():
    pixels = data.splits()["train"].pixels.numpy().astype(np.float64) / 255
    spec = data.preprocess_spec()
    assert abs(spec["mean"][0] - pixels.mean()) < 1e-15
    assert abs(spec["std"][0] - pixels.std(ddof=1)) < 1e-15
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        data._statistics.cache_clear()
        assert data.preprocess_spec() == spec
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=30)
@given(
    batch=st.integers(1, 4),
    height=st.integers(2, 9),
    width=st.integers(2, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_shift_equals_a_roll_with_the_wrapped_border_zeroed(batch, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(1, 256, (batch, 2, height, width), dtype=torch.uint8, generator=generator)
    offsets = torch.randint(-1, 2, (batch, 2), generator=generator)
    shifted = data.shift(pixels, offsets)
    for n, (dy, dx) in enumerate(offsets.tolist()):
        expected = torch.roll(pixels[n], (dy, dx), dims=(1, 2))
        if dy:
            expected[:, 0 if dy > 0 else -1] = 0
        if dx:
            expected[:, :, 0 if dx > 0 else -1] = 0
        assert torch.equal(shifted[n], expected)
