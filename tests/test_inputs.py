"""Input files a careless or hostile user hands over: deep images, decompression bombs, odd CSV and .npy.

Each bad file gets a ValueError naming the file and what was expected (the CLI: one line, exit 2).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from serving_models import save_bundle

import trainfer
from trainfer.cli import main
from trainfer.demo import data
from trainfer.errors import InputError
from trainfer.models import digits_net
from trainfer.serve import readers
from trainfer.serve.image_steps import WALKS
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import iter_csv, load_image, load_npy

DIGIT_SPEC = data.preprocess_spec()
UPSCALE = 4


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Eight test digits, 8-bit ``(8, 1, 8, 8)``."""
    return data.splits()["test"].pixels[:8]


@pytest.fixture(scope="module")
def digit_predictor() -> trainfer.Predictor:
    torch.manual_seed(0)
    return trainfer.Predictor(digits_net().eval(), preprocess=DIGIT_SPEC, labels=data.LABELS)


def enlarged(pixels: np.ndarray) -> np.ndarray:
    return pixels.repeat(UPSCALE, 0).repeat(UPSCALE, 1)


def write_depths(digit: torch.Tensor, folder: Path) -> dict[str, Path]:
    """One digit at every bit depth: 8-bit PNG (L), 16-bit PNG (I;16), 32-bit int TIFF (I), float TIFF (F)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = enlarged(digit[0].numpy())
    images = {
        "L": Image.fromarray(pixels),
        "I;16": Image.fromarray(pixels.astype(np.uint16) * 257),
        "I": Image.fromarray(pixels.astype(np.int32) * 257),
        "F": Image.fromarray(pixels.astype(np.float32) / 255),
    }
    paths = {}
    for mode, image in images.items():
        path = folder / f"digit_{mode.replace(';', '')}.{'png' if mode in ('L', 'I;16') else 'tif'}"
        image.save(path)
        with Image.open(path) as reread:
            assert reread.mode == mode, (path, reread.mode)
        paths[mode] = path
    return paths


def probabilities(results) -> np.ndarray:
    return np.array([[p for _, p in sorted(r.top_k)] for r in results])


# --------------------------------------------------------------------------- bit depths
def test_every_bit_depth_of_a_digit_predicts_like_the_8_bit_one(digits, digit_predictor, tmp_path):
    for index, digit in enumerate(digits):
        paths = write_depths(digit, tmp_path / str(index))
        eight = probabilities(digit_predictor.predict([paths["L"]], top_k=10))
        for mode in ("I;16", "I", "F"):
            deep = probabilities(digit_predictor.predict([paths[mode]], top_k=10))
            np.testing.assert_allclose(deep, eight, rtol=1e-5, atol=1e-6, err_msg=f"mode {mode}")


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_deep_images_load_as_their_8_bit_copy_at_any_channel_count_and_size(digits, tmp_path, channels):
    paths = write_depths(digits[0], tmp_path)
    for size in (8 * UPSCALE, 8):  # as they are, and box-resized
        spec = PreprocessSpec(input_shape=(channels, size, size), resample="box")
        eight = load_image(paths["L"], spec)
        for mode in ("I;16", "I", "F"):
            # the 8-bit path rounds the resized image to bytes, the deep one keeps floats
            np.testing.assert_allclose(load_image(paths[mode], spec), eight, atol=0.5 / 255 + 1e-7, rtol=0)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            Image.fromarray(np.full((4, 4), 70000, np.int32)),
            r"mode I\) holds values in \[70000, 70000\]: expected 0..65535",
        ),
        (Image.fromarray(np.full((4, 4), -0.5, np.float32)), r"mode F\) holds values in \[-0.5, -0.5\]: expected 0..1"),
        (Image.fromarray(np.full((4, 4), np.nan, np.float32)), r"mode F\) holds values in \[nan, nan\]"),
    ],
)
def test_deep_images_outside_their_range_are_refused(image, message, tmp_path):
    path = tmp_path / "odd.tif"
    image.save(path)
    with pytest.raises(ValueError, match=message):
        load_image(path, PreprocessSpec(input_shape=(1, 4, 4)))


# --------------------------------------------------------------------------- decompression bombs
def png_chunk(kind: bytes, body: bytes = b"") -> bytes:
    """One PNG chunk: length, kind, body and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, before: bytes = b"", after: bytes = b"") -> bytes:
    """A grayscale PNG of ``width`` x ``height`` zero pixels (image data for 8 x 8 at most), with the
    chunks ``before`` and ``after`` its image data."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\0" * 72))  # 8 rows: a filter byte, 8 pixels
    return b"\x89PNG\r\n\x1a\n" + header + before + pixels + after + png_chunk(b"IEND")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` grayscale pixels, with almost no data."""
    return png(width, height)


@pytest.mark.parametrize("side", [9000, 14000, 100000])  # over trainfer's limit; 14000 and up over PIL's too
def test_decompression_bombs_are_refused_before_decoding(side, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_claiming(side, side))
    with pytest.raises(ValueError) as error:
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))
    assert str(path) in str(error.value) and "at most 64000000" in str(error.value)
    assert "MAX_IMAGE_PIXELS" in str(error.value)


def test_the_pixel_limit_is_trainfers_own(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    monkeypatch.setattr(readers, "MAX_IMAGE_PIXELS", 63)
    with pytest.raises(ValueError, match=r"claims 8x8 = 64 pixels: expected at most 63"):
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))


def test_a_16_bit_image_at_the_pixel_limit_is_refused_for_its_decoding_memory(tmp_path):
    """The attack: a 124 KB 16-bit PNG of 64 megapixels (the pixel limit) took 1.2 GB to decode."""
    path = tmp_path / "bomb_16.png"
    Image.new("I;16", (8000, 8000)).save(path)
    with pytest.raises(ValueError) as error:
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))
    assert str(error.value) == (
        f"image {str(path)!r} (8000x8000 pixels of mode I;16) takes 1536000000 bytes to decode (24 a pixel): "
        "expected at most 576000000 (trainfer.serve.readers.MAX_IMAGE_DECODE_BYTES)"
    )


@pytest.mark.parametrize(
    ("fmt", "mode", "per_pixel"),
    [("TIFF", "L", None), ("TIFF", "F", 24), ("PNG", "RGB", None), ("WEBP", "RGB", 16), ("JPEG", "CMYK", 16)],
)
def test_the_decoding_budget_counts_the_bytes_a_pixel_of_the_image(fmt, mode, per_pixel, tmp_path, monkeypatch):
    """Within a budget of 10 x 10 pixels at 9 bytes, 8-bit images pass; a float one (24 bytes a pixel)
    and WEBP or CMYK ones (16: their decoders hold a second copy, a served 8000 x 8000 WEBP took
    +978 MB) are refused, naming what they would take."""
    path = tmp_path / f"ten.{fmt.lower()}"
    Image.new(mode, (10, 10)).save(path, fmt)
    monkeypatch.setattr(readers, "MAX_IMAGE_DECODE_BYTES", 900)
    if per_pixel is None:
        assert load_image(path, PreprocessSpec(input_shape=(1, 8, 8))).shape == (1, 8, 8)
        return
    with pytest.raises(
        ValueError, match=rf"mode {mode}\) takes {100 * per_pixel} bytes to decode \({per_pixel} a pixel\)"
    ):
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))


def test_every_8_bit_image_within_the_pixel_limit_fits_the_decoding_budget():
    assert readers.MAX_IMAGE_PIXELS * readers._DECODE_BYTES_PER_PIXEL["8-bit"] <= readers.MAX_IMAGE_DECODE_BYTES


# --------------------------------------------------------------------------- PNG chunk counts
def texts(count: int) -> bytes:
    return b"".join(png_chunk(b"tEXt", b"k%d\0v" % i) for i in range(count))


def animation(frames: int) -> tuple[bytes, bytes]:
    """The chunks of an animated PNG of 8 x 8 pixels: its animation control before the default
    image, then each further frame's control and image data."""
    control = png_chunk(b"acTL", struct.pack(">II", frames + 1, 0))
    frame = struct.pack(">IIIIHHBB", 8, 8, 0, 0, 1, 10, 0, 0)
    data = zlib.compress(b"\0" * 72)
    after = b"".join(
        png_chunk(b"fcTL", struct.pack(">I", 2 * i + 1) + frame)
        + png_chunk(b"fdAT", struct.pack(">I", 2 * i + 2) + data)
        for i in range(frames)
    )
    return control, after


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (texts(20), b""),
        (b"", texts(20)),
        (png_chunk(b"xxXx") * 20, b""),  # unknown ancillary chunks, empty
        (b"", png_chunk(b"IDAT") * 20),  # empty image data
        animation(10),
    ],
    ids=["text-before-the-image", "text-after-it", "unknown", "empty-image-data", "animation-frames"],
)
def test_a_png_of_more_chunks_than_allowed_is_refused_before_pillow_reads_them(before, after, tmp_path, monkeypatch):
    """The attack: an 8x8 PNG of 600,000 chunks (12.5 MB) took 2-3 s of CPU in Pillow, a chunk at a time."""
    from trainfer.server.uploads import read_upload

    data = png(8, 8, before, after)
    assert len(data) < 1024  # no KiB adds to the limit
    path = tmp_path / "chunks.png"
    path.write_bytes(data)
    monkeypatch.setattr(readers, "MAX_PNG_CHUNKS", 16)
    limit = (
        "holds more than 16 chunks: expected at most 16 (trainfer.serve.readers.MAX_PNG_CHUNKS) plus one per KiB "
        f"of its {len(data)} bytes"
    )
    with pytest.raises(InputError) as refused:
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))
    assert str(refused.value) == f"PNG file {str(path)!r} {limit}"
    with pytest.raises(InputError) as refused:
        read_upload(data, "up.png", "image/png", PreprocessSpec(input_shape=(1, 8, 8)))
    assert str(refused.value) == f"PNG file 'up.png' {limit}"
    monkeypatch.setattr(readers, "MAX_PNG_CHUNKS", 2**20)
    assert load_image(path, PreprocessSpec(input_shape=(1, 8, 8))).shape == (1, 8, 8)  # the file itself is fine


@pytest.mark.parametrize(("padding", "texts_allowed"), [(0, 13), (3000, 15)])
def test_the_png_chunk_limit_is_max_png_chunks_plus_one_per_kib_of_the_file(padding, texts_allowed, tmp_path):
    """IHDR, IDAT and IEND, one padding chunk (if any) and the tEXt chunks count; with 16 allowed and
    3000 bytes of padding, 2 more are."""
    spec = PreprocessSpec(input_shape=(1, 8, 8))
    pad = png_chunk(b"tEXt", b"pad\0" + b"x" * padding) if padding else b""
    for count, passes in [(texts_allowed, True), (texts_allowed + 1, False)]:
        path = tmp_path / f"{count}.png"
        path.write_bytes(png(8, 8, pad + texts(count)))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(readers, "MAX_PNG_CHUNKS", 16)
            if passes:
                assert load_image(path, spec).shape == (1, 8, 8)
            else:
                with pytest.raises(InputError, match="holds more than"):
                    load_image(path, spec)


@pytest.mark.parametrize(
    "data",
    [
        png(8, 8, texts(20))[:40],  # truncated inside a chunk's header
        png(8, 8, png_chunk(b"tEXt", b"k\0v")[:-7] + b"\xff\xff\xff\xff" + texts(20)),  # a length past the end
    ],
    ids=["truncated", "length-past-the-end"],
)
def test_a_png_whose_chunks_end_early_is_pillows_to_refuse(data, tmp_path, monkeypatch):
    """The count stops where the file ends or a length points past it: Pillow, reading the same
    lengths, finds the file truncated."""
    path = tmp_path / "short.png"
    path.write_bytes(data)
    monkeypatch.setattr(readers, "MAX_PNG_CHUNKS", 16)
    with pytest.raises(InputError, match=r"cannot read image .*short\.png'"):
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))


def test_predict_refuses_a_png_of_too_many_chunks_in_one_line_with_status_2(tmp_path):
    bundle = save_bundle(tmp_path / "b", seed=0, labels=["a", "b", "c"])
    path = tmp_path / "chunks.png"
    path.write_bytes(png(8, 8, png_chunk(b"xxXx") * 2 * readers.MAX_PNG_CHUNKS))  # 24 KiB: 1048 allowed
    result = CliRunner().invoke(main, ["predict", str(bundle), str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: PNG file {str(path)!r} holds more than 1048 chunks: expected at most 1024 "
        "(trainfer.serve.readers.MAX_PNG_CHUNKS) plus one per KiB of its 24645 bytes"
    ]


# --------------------------------------------------------------------------- JPEG, GIF and TIFF pieces
def pillow_file(fmt: str, **options: object) -> bytes:
    """An 8 x 8 grayscale image as Pillow writes it in ``fmt``."""
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, fmt, **options)
    return out.getvalue()


def jpeg_with(pieces: bytes) -> bytes:
    """A JPEG with ``pieces`` right after its start-of-image marker."""
    data = pillow_file("JPEG")
    return data[:2] + pieces + data[2:]


def gif_with(pieces: bytes) -> bytes:
    """A GIF with ``pieces`` before its first image descriptor."""
    data = pillow_file("GIF")
    first_image = data.index(b",")
    return data[:first_image] + pieces + data[first_image:]


def tiff(entries: list[tuple[int, int, int, int]], data: bytes = b"\0") -> bytes:
    """A little-endian TIFF: ``data`` at offset 8, then one directory of ``entries`` (tag, type, count, value)."""
    table = b"".join(struct.pack("<HHII", *entry) for entry in sorted(entries))
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + struct.pack("<H", len(entries)) + table + bytes(4)


def tiff_of_strips(rows: int, extra_tags: int = 0) -> bytes:
    """An uncompressed 1 x ``rows`` TIFF of one strip per row (all reading the same byte), with
    ``extra_tags`` unknown tags besides its nine."""
    offsets = struct.pack(f"<{rows}I", *[8] * rows)
    counts = struct.pack(f"<{rows}I", *[1] * rows)
    entries = [(256, 3, 1, 1), (257, 3, 1, rows), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (277, 3, 1, 1)]
    entries += [(278, 3, 1, 1), (273, 4, rows, 9), (279, 4, rows, 9 + len(offsets))]
    entries += [(1000 + k, 3, 1, 0) for k in range(extra_tags)]
    return tiff(entries, b"\0" + offsets + counts)


#: The entries of an uncompressed 8 x 8 grayscale TIFF whose pixels start at offset 8.
TIFF_8X8 = [(256, 3, 1, 8), (257, 3, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8)]
TIFF_8X8 += [(277, 3, 1, 1), (278, 3, 1, 8), (279, 4, 1, 64)]

#: Files of 20 pieces Pillow reads one at a time in Python, each with its format's limit.
PIECES = {
    "jpeg-comments": (jpeg_with(b"\xff\xfe\0\2" * 20), "JPEG", "MAX_JPEG_SEGMENTS"),
    "jpeg-fill-bytes": (jpeg_with(b"\xff" * 20), "JPEG", "MAX_JPEG_SEGMENTS"),
    "jpeg-stray-bytes": (jpeg_with(b"\xff\xe0\0\2" + b"x" * 20), "JPEG", "MAX_JPEG_SEGMENTS"),
    "gif-comments": (gif_with(b"!\xfe\1x\0" * 20), "GIF", "MAX_GIF_BLOCKS"),
    "gif-sub-blocks": (gif_with(b"!\xff" + b"\1x" * 20 + b"\0"), "GIF", "MAX_GIF_BLOCKS"),
    "gif-stray-bytes": (gif_with(b"\0" * 20), "GIF", "MAX_GIF_BLOCKS"),
    "tiff-entries": (tiff_of_strips(1, extra_tags=20), "TIFF", "MAX_TIFF_ENTRIES"),
    "tiff-strips": (tiff_of_strips(20), "TIFF", "MAX_TIFF_ENTRIES"),
    "tiff-rationals": (tiff([*TIFF_8X8, (282, 5, 20, 8)], bytes(160)), "TIFF", "MAX_TIFF_ENTRIES"),  # XResolution
}


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # tiff-rationals: one XResolution expected
@pytest.mark.parametrize("kind", PIECES)
def test_an_image_of_more_pieces_than_allowed_is_refused_before_pillow_reads_them(kind, tmp_path, monkeypatch):
    """The attacks: 600,000 empty JPEG comments (2.4 MB) took 0.45 s of CPU, 1.2 MB of JPEG fill bytes
    0.42 s, 600,000 GIF comments (3 MB) 0.31 s, a TIFF of 600,000 one-row strips (3.6 MB) 4.7 s, a TIFF
    XResolution of 1,000,000 rationals (8 MB) 3.3 s."""
    from trainfer.server.uploads import read_upload

    data, fmt, name = PIECES[kind]
    assert len(data) < 1024  # no KiB adds to the limit
    path = tmp_path / f"pieces.{fmt.lower()}"
    path.write_bytes(data)
    spec = PreprocessSpec(input_shape=(1, 8, 8))
    monkeypatch.setattr(readers, name, 2**20)
    load_image(path, spec)  # the file itself is fine
    monkeypatch.setattr(readers, name, 16)
    what = readers._STEP_LIMITS[fmt][1]
    limit = f"holds more than 16 {what}: expected at most 16 (trainfer.serve.readers.{name}) plus one per KiB"
    with pytest.raises(InputError) as refused:
        load_image(path, spec)
    assert str(refused.value) == f"{fmt} file {str(path)!r} {limit} of its {len(data)} bytes"
    with pytest.raises(InputError) as refused:
        read_upload(data, f"up.{fmt.lower()}", "application/octet-stream", spec)
    assert str(refused.value) == f"{fmt} file 'up.{fmt.lower()}' {limit} of its {len(data)} bytes"


class _CountingReads(io.BytesIO):
    """A file in memory counting the reads made of it."""

    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # tiff-rationals: one XResolution expected
@pytest.mark.parametrize(
    "data",
    [
        *(data for data, _, _ in PIECES.values()),
        jpeg_with(b"\xff\x00" * 20),  # escaped 0xFF bytes
        jpeg_with(b"\xff\xd0" * 20),  # markers without a length
        gif_with(b"!\xf9\0" + b"\1x" * 20 + b"\0"),  # an empty first sub-block: Pillow reads on to the next end
        gif_with(b"!\xfe\0" * 20),  # empty comments
        pillow_file("TIFF", big_tiff=True),
    ],
    ids=[
        *PIECES,
        "jpeg-escaped-ff",
        "jpeg-markers-without-length",
        "gif-empty-first-sub-block",
        "gif-empty-comments",
        "bigtiff",
    ],
)
def test_the_walk_counts_every_piece_pillow_reads_in_python(data):
    """Pillow reads a file once or twice per piece it walks in Python: the walk's count bounds its reads."""
    stream = _CountingReads(data)
    with Image.open(stream) as image:
        image.load()
    fmt, walk = next(found for prefix, found in WALKS.items() if data.startswith(prefix))
    steps = sum(walk(io.BytesIO(data), len(data)))
    assert stream.reads <= 2 * steps + 40, (fmt, stream.reads, steps)


#: TIFFs whose numeric entries hold more values than their entries, and how many they hold in all.
TIFF_VALUES = {
    "one-row strips": (tiff_of_strips(20), 47),  # 7 entries of one value, 20 strip offsets, 20 byte counts
    "an unknown tag of 40 doubles": (tiff([*TIFF_8X8, (65000, 12, 40, 72)], bytes(64 + 320)), 49),
    "XResolution of 4 rationals": (tiff([*TIFF_8X8, (282, 5, 4, 72)], bytes(64 + 32)), 13),
    "BigTIFF": (pillow_file("TIFF", big_tiff=True), 9),
}


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # XResolution: one rational expected
@pytest.mark.parametrize("kind", TIFF_VALUES)
def test_a_tiff_of_more_values_than_allowed_is_refused_before_pillow_decodes_them(kind, tmp_path, monkeypatch):
    """Pillow decodes a numeric entry value by value in Python: an 8 MB BitsPerSample of 4,000,000 values
    took 0.23-0.25 s of CPU per request. Counted from the entries' headers, tags Pillow skips included."""
    from trainfer.server.uploads import read_upload

    data, values = TIFF_VALUES[kind]
    path = tmp_path / "values.tiff"
    path.write_bytes(data)
    spec = PreprocessSpec(input_shape=(1, 8, 8))
    monkeypatch.setattr(readers, "MAX_TIFF_VALUES", values)
    load_image(path, spec)  # the file itself is fine, and holds no more than its count
    monkeypatch.setattr(readers, "MAX_TIFF_VALUES", values - 1)
    bound = f"expected at most {values - 1} (trainfer.serve.readers.MAX_TIFF_VALUES; Pillow decodes each in Python)"
    with pytest.raises(InputError) as refused:
        load_image(path, spec)
    assert str(refused.value) == (
        f"TIFF file {str(path)!r} holds {values} values in its first directory's numeric entries: {bound}"
    )
    with pytest.raises(InputError, match=re.escape(f"TIFF file 'up.tiff' holds {values} values")):
        read_upload(data, "up.tiff", "application/octet-stream", spec)


@pytest.mark.parametrize(
    "options",
    [
        {"save_all": True, "append_images": [Image.new("L", (8, 8))] * 5},
        {"compression": "tiff_lzw", "strip_size": 1},
        {"dpi": (300, 300), "icc_profile": b"\0" * 200_000, "big_tiff": True},
        {"mode": "P"},
        {"mode": "F"},
        {"mode": "I;16"},
    ],
    ids=["multi-page", "lzw-one-row-strips", "dpi-icc-bigtiff", "palette", "float", "16-bit"],
)
def test_the_values_counted_are_those_pillow_reads_from_the_first_directory(options):
    """Bytes, text and undefined entries (an ICC profile) are one object each to Pillow, and not counted."""
    from trainfer.serve.image_steps import tiff_values

    options = dict(options)
    image = Image.new(str(options.pop("mode", "RGB")), (16, 40))
    out = io.BytesIO()
    image.save(out, "TIFF", **options)
    data = out.getvalue()
    with Image.open(io.BytesIO(data)) as opened:
        directory = opened.tag_v2
        numeric = [tag for tag in directory if directory.tagtype[tag] not in (1, 2, 7)]  # BYTE, ASCII, UNDEFINED
        read = sum(len(v) if isinstance(v := directory[tag], tuple) else 1 for tag in numeric)
    assert tiff_values(io.BytesIO(data), len(data)) == read


def test_a_compressed_tiffs_strips_are_read_by_libtiff_and_not_counted(tmp_path, monkeypatch):
    """Pillow hands a compressed TIFF whole to libtiff (one tile, read in C): only its entries count."""
    path = tmp_path / "deflate.tif"
    Image.new("L", (1, 40)).save(path, "TIFF", compression="tiff_deflate", strip_size=1)
    with Image.open(path) as image:
        assert len(image.tag_v2[273]) == 40  # 40 strips
    monkeypatch.setattr(readers, "MAX_TIFF_ENTRIES", 16)
    assert load_image(path, PreprocessSpec(input_shape=(1, 8, 8))).shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("JPEG", {"progressive": True, "exif": Image.Exif(), "comment": b"c", "icc_profile": b"\0" * 200_000}),
        ("GIF", {"save_all": True, "append_images": [Image.new("L", (8, 8), k) for k in range(50)], "comment": "c"}),
        ("TIFF", {"save_all": True, "append_images": [Image.new("L", (8, 8))] * 50}),
        ("PNG", {"save_all": True, "append_images": [Image.new("L", (8, 8), k) for k in range(50)]}),
    ],
    ids=["jpeg-with-metadata", "animated-gif", "multipage-tiff", "animated-png"],
)
def test_images_pillow_writes_take_few_steps(fmt, options):
    """What Pillow writes, metadata and frames included, stays far below the limits (real files on the
    development machine took at most 13 JPEG, 8 GIF and 26 TIFF steps)."""
    data = pillow_file(fmt, **options)
    fmt, walk = next(found for prefix, found in WALKS.items() if data.startswith(prefix))
    assert sum(walk(io.BytesIO(data), len(data))) < 200


def test_predict_refuses_a_jpeg_of_too_many_pieces_in_one_line_with_status_2(tmp_path):
    bundle = save_bundle(tmp_path / "b", seed=0, labels=["a", "b", "c"])
    path = tmp_path / "comments.jpg"
    path.write_bytes(jpeg_with(b"\xff\xfe\0\2" * 2 * readers.MAX_JPEG_SEGMENTS))
    result = CliRunner().invoke(main, ["predict", str(bundle), str(path)])
    assert result.exit_code == 2, result.output
    size = path.stat().st_size
    assert result.output.strip().splitlines() == [
        f"error: JPEG file {str(path)!r} holds more than {1024 + size // 1024} marker segments, fill and stray "
        f"bytes before its image data: expected at most 1024 (trainfer.serve.readers.MAX_JPEG_SEGMENTS) plus "
        f"one per KiB of its {size} bytes"
    ]


# --------------------------------------------------------------------------- CSV and .npy files
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_rows_with_more_values_than_the_header_are_refused(tmp_path):
    path = write(tmp_path / "wide.csv", "a,b\n1,2\n3,4,5\n")
    with pytest.raises(ValueError, match=r"wide.csv' line 3: expected 2 values \(one per header column\), got 3"):
        list(iter_csv(path, PreprocessSpec(columns=("a", "b"))))


def test_a_csv_for_a_model_whose_samples_are_not_rows_is_refused_before_it_is_read(tmp_path):
    path = write(tmp_path / "rows.csv", "a,b\n1,2\n")
    expected = r"CSV rows are samples of shape \(F,\) \(tabular models\), and it takes samples of shape \(1, 8, 8\)"
    with pytest.raises(InputError, match=r"cannot read CSV file '.*rows.csv' for this model: " + expected):
        next(iter_csv(path, PreprocessSpec(input_shape=(1, 8, 8))))
    assert next(iter_csv(path, PreprocessSpec(input_shape=(2,)))).shape == (1, 2)


def test_a_header_only_csv_is_refused(tmp_path):
    path = write(tmp_path / "head.csv", "a,b\n")
    with pytest.raises(ValueError, match=r"head.csv' has a header but no data rows: expected at least one row of 2"):
        list(iter_csv(path, PreprocessSpec(columns=("a", "b"))))


def npy(path: Path, array=None, raw: bytes | None = None) -> Path:
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.save(path, array)
    return path


BAD_NPY = {
    "empty.npy": (None, b"", r"empty.npy': expected a .npy array .*got an empty file \(0 bytes\)"),
    "text.npy": (None, b"hello, world", r"text.npy': expected a .npy array .*got a file starting with b'hello,'"),
    "scalar.npy": (
        np.float32(3.0),
        None,
        r"scalar.npy' holds a 0-d array \(one number\): expected a batch \(N, 1, 8, 8\)",
    ),
    "none.npy": (np.zeros((0, 1, 8, 8), np.float32), None, r"none.npy' holds no samples \(shape \(0, 1, 8, 8\)\)"),
    "cut.npy": (None, b"\x93NUMPY\x01\x00", r"cannot read '.*cut.npy' as a .npy array"),
}


@pytest.mark.parametrize("name", sorted(BAD_NPY))
def test_bad_npy_files_are_named(name, tmp_path):
    array, raw, message = BAD_NPY[name]
    path = npy(tmp_path / name, array, raw)
    with pytest.raises(ValueError, match=message):
        load_npy(path, PreprocessSpec(input_shape=(1, 8, 8)))


def test_npy_files_are_never_unpickled(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy' as a .npy array: .*allow_pickle=False"):
        load_npy(path, PreprocessSpec())


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_bundle(tmp_path_factory.mktemp("bundle") / "b", 0)


def cli_error(bundle: Path, *inputs: Path, options: tuple[str, ...] = ()) -> str:
    result = CliRunner().invoke(main, ["predict", str(bundle), *map(str, inputs), *options])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("name", sorted(BAD_NPY))
def test_cli_bad_npy_files_one_line_exit_2(name, bundle, tmp_path):
    array, raw, message = BAD_NPY[name]
    assert re.search(message, cli_error(bundle, npy(tmp_path / name, array, raw)))


def table_model() -> torch.nn.Module:
    """A classifier of table rows of 2 values."""
    return torch.nn.Linear(2, 3)


def test_cli_bad_csv_files_one_line_exit_2(bundle, tmp_path):
    table = trainfer.save(table_model(), tmp_path / "table", factory=f"{__name__}:table_model")
    trust = ("--trust-factory",)  # this test module's own factory
    assert "has a header but no data rows" in cli_error(table, write(tmp_path / "head.csv", "a,b\n"), options=trust)
    assert "expected 2 values" in cli_error(table, write(tmp_path / "wide.csv", "a,b\n1,2,3\n"), options=trust)
    assert "CSV rows are samples of shape (F,)" in cli_error(bundle, write(tmp_path / "rows.csv", "a,b\n1,2\n"))


def test_cli_decompression_bomb_one_line_exit_2(bundle, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_claiming(100000, 100000))
    assert "expected at most 64000000" in cli_error(bundle, path)


@pytest.mark.parametrize("kind", ["postscript", "jpeg2000"])
def test_an_image_is_decoded_only_in_the_listed_formats_whatever_its_name_says(kind, tmp_path, monkeypatch):
    """Pillow picks a decoder from the bytes: a .png holding PostScript would run Ghostscript (a
    program, on a file it writes), one holding JPEG 2000 its decoder. Both are refused, named."""
    from PIL import EpsImagePlugin, Image

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript ran"))
    path = tmp_path / "x.png"
    if kind == "postscript":
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    else:
        pytest.importorskip("PIL.Jpeg2KImagePlugin")
        Image.new("L", (8, 8)).save(path, "JPEG2000")
    with pytest.raises(InputError, match=r"'.*x\.png': expected one of the formats BMP, GIF, JPEG, PNG, TIFF, WEBP"):
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))


def test_a_csv_header_with_a_byte_order_mark_reads_as_without_one(tmp_path):
    """Spreadsheet programs write UTF-8 with a BOM: its first column's name must still match."""
    spec = PreprocessSpec(input_shape=(2,), columns=("a", "b"))
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_text("a,b\n1,2\n", encoding="utf-8")
    marked.write_text("a,b\n1,2\n", encoding="utf-8-sig")
    assert torch.equal(torch.cat(list(iter_csv(marked, spec))), torch.cat(list(iter_csv(plain, spec))))


def test_a_csv_naming_a_picked_column_twice_is_refused_and_an_unpicked_repeat_is_fine(tmp_path):
    """Which copy of a repeated column holds the values would be a guess: refused, named."""
    spec = PreprocessSpec(input_shape=(2,), columns=("a", "b"))
    repeated, unpicked = tmp_path / "repeated.csv", tmp_path / "unpicked.csv"
    repeated.write_text("a,b,a\n1,2,3\n")
    unpicked.write_text("a,b,c,c\n1,2,3,4\n")
    with pytest.raises(InputError, match=r"names column\(s\) \['a'\] more than once"):
        list(iter_csv(repeated, spec))
    assert torch.cat(list(iter_csv(unpicked, spec))).tolist() == [[1.0, 2.0]]


def _tiff_declaring_a_tile(path: Path, width: int, height: int, tile: int) -> None:
    """A little-endian 8-bit grayscale TIFF of ``width x height`` whose one tile is ``tile x tile``."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1)]
    tags += [(322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, 16)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, kind, 1, data_offset if tag == 324 else value) if kind == 4
        else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in tags
    )  # fmt: skip
    path.write_bytes(b"II" + struct.pack("<HI", 42, 8) + struct.pack("<H", len(tags)) + entries + bytes(4 + 16))


def test_a_tiff_declaring_a_tile_far_larger_than_its_pixels_is_refused_from_its_header(tmp_path):
    """The attack: a 16 x 16 TIFF declaring one 32768 x 32768 tile took 1 GB (its decoder allocates the tile)."""
    path = tmp_path / "tile.tiff"
    _tiff_declaring_a_tile(path, 16, 16, 32768)
    with pytest.raises(ValueError, match=r"\(16x16 pixels of mode L, declaring a tile or strip of 1073741824 pixels\)"):
        load_image(path, PreprocessSpec(input_shape=(1, 8, 8)))


def rle8_bmp(width: int, height: int, rows: bytes) -> bytes:
    """An 8-bit RLE-compressed (BI_RLE8) BMP of ``width`` x ``height`` whose pixel data is ``rows``."""
    palette = b"".join(bytes((k, k, k, 0)) for k in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def test_an_rle_bmp_is_refused_before_pillow_decodes_it_in_python_and_a_plain_bmp_is_read(tmp_path):
    """Pillow decodes RLE BMPs in Python, a run at a time, bounded by no header: refused, naming why."""
    spec = PreprocessSpec(input_shape=(1, 8, 8))
    rle = tmp_path / "rle.bmp"
    rle.write_bytes(rle8_bmp(8, 8, b"\x08\x80\x00\x00" * 8 + b"\x00\x01"))  # 8 rows of 8 pixels of 128
    with Image.open(rle) as image:
        assert image.tile[0][0] == "bmp_rle" and image.size == (8, 8)  # a BMP Pillow itself reads
    with pytest.raises(InputError, match=r"an RLE-compressed BMP is not decoded .*expected an uncompressed BMP"):
        load_image(rle, spec)
    plain = tmp_path / "plain.bmp"
    Image.new("L", (8, 8), 128).save(plain)
    assert torch.allclose(load_image(plain, spec), torch.full((1, 8, 8), 128 / 255))


def test_a_jpeg_of_more_scans_than_max_jpeg_scans_is_refused_and_a_progressive_one_is_read(tmp_path):
    """Attacker round 6 H-1: a progressive JPEG repeating its last scan thousands of times (100 KB) took
    12.5 s of libjpeg's CPU; scans are counted over the whole file before decoding."""
    spec = PreprocessSpec(input_shape=(1, 8, 8))
    buffer = io.BytesIO()
    Image.radial_gradient("L").save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    scans = data.count(b"\xff\xda")
    assert 1 < scans <= readers.MAX_JPEG_SCANS  # a real progressive file passes
    progressive = tmp_path / "progressive.jpg"
    progressive.write_bytes(data)
    assert load_image(progressive, spec).shape == (1, 8, 8)
    end = data.rindex(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda") : end]
    repeated = tmp_path / "repeated.jpg"
    repeated.write_bytes(data[:end] + last_scan * (readers.MAX_JPEG_SCANS - scans + 1) + data[end:])
    message = rf"holds more than {readers.MAX_JPEG_SCANS} scans: expected at most {readers.MAX_JPEG_SCANS}"
    with pytest.raises(InputError, match=message):
        load_image(repeated, spec)
    with pytest.raises(InputError, match=message):
        load_image(io.BytesIO(repeated.read_bytes()), spec)  # an upload in memory


def test_npy_headers_are_parsed_one_at_a_time(tmp_path, monkeypatch):
    """numpy parses a .npy header with ast.literal_eval, which CPython 3.11 cannot run in two threads at once
    (gh-106905: a /predict run in CI answered 500 with "AST constructor recursion depth mismatch"): the header
    check and the load each parse under one lock, and never hold it while anything else runs."""
    from trainfer.serve import readers

    class Recording:
        def __init__(self):
            self.entered = 0

        def __enter__(self):
            self.entered += 1

        def __exit__(self, *error):
            return False

    lock = Recording()
    monkeypatch.setattr(readers, "_NPY_HEADER_LOCK", lock)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    spec = trainfer.PreprocessSpec(input_shape=(1, 8, 8))
    assert readers.read_npy(tmp_path / "x.npy", spec).shape == (2, 1, 8, 8)
    assert lock.entered == 2  # the header check's parse and np.load's
