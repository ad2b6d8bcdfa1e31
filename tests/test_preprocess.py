"""PreprocessSpec: validation with expected-vs-got messages, images, CSV columns, normalisation."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainfer.errors import InputError, NonFiniteError
from trainfer.serve.inputs import gather, iter_raw
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import iter_csv, load_image

IMAGE = PreprocessSpec(input_shape=(1, 8, 8))


def test_round_trip_through_dict():
    spec = PreprocessSpec(input_shape=(3, 4, 4), mean=[0.1, 0.2, 0.3], std=0.5, channel_order="BGR", target_mean=2)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.std == (0.5,) and spec.target_mean == (2.0,)
    with pytest.raises(ValueError, match=r"unknown preprocess keys \['colour'\]"):
        PreprocessSpec.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="std must be non-zero"):
        PreprocessSpec(std=[0.0])
    with pytest.raises(ValueError, match="2 columns need input_shape"):
        PreprocessSpec(columns=["a", "b"], input_shape=(3,))


@settings(max_examples=30)
@given(channels=st.integers(1, 4), size=st.integers(2, 6), batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_normalisation_is_per_channel(channels, size, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.rand(channels, generator=generator, dtype=torch.float64).tolist()
    std = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).tolist()
    spec = PreprocessSpec(input_shape=(channels, size, size), dtype="float64", mean=mean, std=std)
    raw = torch.rand(batch, channels, size, size, generator=generator, dtype=torch.float64)
    mean_, std_ = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    expected = (raw - mean_) / std_
    torch.testing.assert_close(spec.prepare(raw), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(spec.prepare(raw[0]), expected[:1], rtol=0, atol=1e-12)  # one sample, no batch dim


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (torch.zeros(2, 3, 8, 8), r"wrong channel count: expected 1 channel\(s\) \(sample shape \(1, 8, 8\)\), got 3"),
        (
            torch.zeros(2, 1, 8, 7),
            r"wrong input shape: expected a batch \(N, 1, 8, 8\) or one sample \(1, 8, 8\), "
            r"got \(2, 1, 8, 7\)",
        ),
        (torch.zeros(0, 1, 8, 8), "empty input: expected at least one sample of shape"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.complex64), "wrong input dtype: expected real numbers"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.bool), "wrong input dtype"),
        (np.array([["a"] * 8] * 8), "wrong input dtype: expected real numbers, got numpy dtype <U1"),
        (torch.tensor([[[[float("nan")] * 8] * 8]] * 3), r"NaN or inf values in sample\(s\) \[0, 1, 2\]"),
    ],
)
def test_bad_inputs_name_expected_and_got(raw, message):
    with pytest.raises(ValueError, match=message):
        IMAGE.prepare(raw)


def test_inf_is_rejected_and_ints_are_accepted():
    batch = torch.zeros(3, 1, 8, 8)
    batch[1, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        IMAGE.prepare(batch)
    assert IMAGE.prepare(np.zeros((1, 8, 8), dtype=np.uint8)).dtype == torch.float32


#: An image model trained on pixels scaled to [0, 1] (the demo's digits record mean and std like these).
SCALED = PreprocessSpec(input_shape=(1, 8, 8), mean=[0.3], std=[0.4])
BYTES = np.full((2, 1, 8, 8), 200, dtype=np.uint8)  # raw pixels the caller forgot to scale


@pytest.mark.parametrize(
    ("spec", "raw", "warned"),
    [
        (SCALED, BYTES, True),
        (SCALED, torch.from_numpy(BYTES).long(), True),  # any integer type
        (SCALED, BYTES.astype(np.float32) / 255, False),  # scaled: what the model was trained on
        (SCALED, np.ones((2, 1, 8, 8), dtype=np.uint8), False),  # integers within [0, 1] are scaled pixels too
        (SCALED, BYTES.astype(np.float32), False),  # floats are the caller's choice: never second-guessed
        (PreprocessSpec(input_shape=(1, 8, 8), mean=[33.0], std=[60.0]), BYTES, False),  # trained on 0..255
        (PreprocessSpec(input_shape=(1, 8, 8), mean=[0.3], std=[0.4], pixel_scale=1.0), BYTES, False),
        (IMAGE, BYTES, False),  # no recorded normalisation: nothing says what the model was trained on
        (PreprocessSpec(input_shape=(3,), mean=[0.3], std=[0.4]), np.full((2, 3), 200, np.uint8), False),  # a table
    ],
)
def test_integer_pixels_a_scaled_image_model_never_saw_are_warned_about(spec, raw, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.prepare(raw)
    said = [str(w.message) for w in caught if "tensors and arrays are not scaled" in str(w.message)]
    assert len(said) == warned


def test_the_unscaled_pixels_warning_is_given_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per text and place (a new filter forgets the past)
        for _ in range(3):
            SCALED.prepare(BYTES)
    assert len([w for w in caught if "tensors and arrays are not scaled" in str(w.message)]) == 1


def write_image(path, array, mode):
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_images_are_converted_resized_and_scaled(tmp_path):
    gray = write_image(tmp_path / "g.png", np.full((16, 16), 255, np.uint8), "L")
    sample = load_image(gray, IMAGE)
    assert sample.shape == (1, 8, 8) and torch.allclose(sample, torch.ones(1, 8, 8))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    red = write_image(tmp_path / "r.jpg", rgb, "RGB")
    spec = PreprocessSpec(input_shape=(3, 4, 4))
    assert load_image(red, spec)[0].mean() > 0.9 and load_image(red, spec)[2].mean() < 0.1
    bgr = load_image(red, PreprocessSpec(input_shape=(3, 4, 4), channel_order="BGR"))
    assert bgr[2].mean() > 0.9 and bgr[0].mean() < 0.1
    assert load_image(red, IMAGE).shape == (1, 8, 8)  # RGB to grayscale
    with pytest.raises(ValueError, match="is 4x4, expected 8x8 .resize is off"):
        load_image(red, PreprocessSpec(input_shape=(1, 8, 8), resize=False))


def test_resample_filter_is_chosen_by_name(tmp_path):
    checker = np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))  # 8x8, two white blocks
    path = write_image(tmp_path / "c.png", np.kron(checker, np.ones((3, 3), np.uint8)), "L")  # enlarged 3x
    boxed = load_image(path, PreprocessSpec(input_shape=(1, 8, 8), resample="box"))
    assert torch.equal(boxed[0], torch.from_numpy(checker).float() / 255)
    with pytest.raises(
        ValueError, match="resample must be one of bilinear, box, nearest, bicubic, lanczos; got 'cubic'"
    ):
        PreprocessSpec(resample="cubic")


def test_unreadable_and_missing_files(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        gather([broken], IMAGE)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        gather([tmp_path / "missing.png"], IMAGE)
    with pytest.raises(ValueError, match="is a directory"):
        gather([tmp_path], IMAGE)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"expected an image .*\.csv or \.npy file"):
        gather([tmp_path / "notes.txt"], IMAGE)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*bad.npy"):
        gather([tmp_path / "bad.npy"], IMAGE)


def test_npy_never_unpickles(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read"):
        gather(tmp_path / "objects.npy", IMAGE)
    np.save(tmp_path / "ok.npy", np.ones((3, 1, 8, 8), np.float32))
    assert gather(tmp_path / "ok.npy", IMAGE).shape == (3, 1, 8, 8)


def test_csv_columns_by_name_in_chunks(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,b,a,c\n" + "".join(f"{i},{i + 0.5},{-i},{i * 2}\n" for i in range(5)))
    spec = PreprocessSpec(columns=["a", "b"])
    chunks = list(iter_csv(path, spec, chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    table = torch.cat(chunks)
    assert table[:, 0].tolist() == [0, -1, -2, -3, -4] and table[:, 1].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert gather([path], PreprocessSpec()).shape == (5, 4)  # no columns named: all, in file order


def test_csv_errors_name_column_line_and_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['c'\]: expected \['a', 'c'\], got \['a', 'b'\]"):
        gather(path, PreprocessSpec(columns=["a", "c"]))
    with pytest.raises(ValueError, match="line 3, column 'b': expected a number written in ASCII .*; got 'x'"):
        gather(path, PreprocessSpec(columns=["a", "b"]))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty: expected a header row"):
        gather(tmp_path / "empty.csv", PreprocessSpec())


def test_iter_raw_is_lazy_and_keeps_order(tmp_path):
    consumed = []

    def samples():
        for i in range(4):
            consumed.append(i)
            yield torch.full((1, 8, 8), float(i))

    stream = iter_raw(samples(), IMAGE)
    first = next(stream)
    assert consumed == [0] and first.shape == (1, 1, 8, 8)
    assert [int(chunk[0, 0, 0, 0]) for chunk in stream] == [1, 2, 3]


def test_target_scaling_is_inverted():
    spec = PreprocessSpec(target_mean=[10.0, -1.0], target_std=[2.0, 0.5])
    scaled = torch.tensor([[1.0, 2.0]])
    assert spec.unscale_target(scaled).tolist() == [[12.0, 0.0]]


def test_large_finite_values_are_not_mistaken_for_inf():
    huge = torch.full((2, 1, 8, 8), 3e38)  # finite, but their float32 sum overflows
    assert torch.equal(IMAGE.prepare(huge), huge)
    huge[1, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        IMAGE.prepare(huge)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 1.5, -2.0, 3e38, -3e38, 1.7e308, float("nan"), float("inf"), -float("inf")]),
        min_size=12,
        max_size=12,
    ),
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=st.sampled_from([(2, 2, 3), (1, 3, 4), (4, 3), (12,), (2, 6)]),
)
def test_a_plain_array_gets_the_same_batch_or_the_same_error_as_the_full_checks(values, dtype, shape):
    """check_batch's fast path for NumPy arrays (a finite sum proves finite elements) never changes
    the answer: the batch equals the full path's, a non-finite sample is named as the full path names
    it, and finite values whose sum overflows still pass."""
    spec = PreprocessSpec(input_shape=(2, 3))
    with np.errstate(over="ignore"):
        array = np.array(values, dtype=np.float64).astype(dtype).reshape(shape)

    def outcome(raw):
        try:
            return ("ok", spec.check_batch(raw))
        except (InputError, NonFiniteError) as error:
            return ("error", str(error))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflowing sum of valid numbers must not warn the user
        fast, full = outcome(array), outcome(torch.from_numpy(array.copy()))  # a tensor never takes the fast path
    assert fast[0] == full[0]
    if fast[0] == "ok":
        assert torch.equal(fast[1], full[1]) and fast[1].dtype == full[1].dtype
    else:
        assert fast[1] == full[1]
