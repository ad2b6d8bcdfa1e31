"""File readers: images, CSV rows and ``.npy`` arrays become raw samples, bounded before they are decoded.

Images are converted to the channel count of the spec's ``input_shape``, resized and scaled (see
:mod:`trainfer.serve.preprocess`); images over :data:`MAX_IMAGE_PIXELS` pixels, or whose decoding would take
more than :data:`MAX_IMAGE_DECODE_BYTES`, and PNG, JPEG, GIF or TIFF files whose opening would take Pillow
more steps in Python than :data:`MAX_PNG_CHUNKS` (and its kin) allow, and TIFF files declaring more values than
:data:`MAX_TIFF_VALUES`, are refused before decoding.
CSV files give one sample per row (``columns`` picked by name), in chunks; ``.npy`` headers are checked before
any data is read (numbers only, at most :data:`MAX_NPY_ELEMENTS` read into memory).
"""

from __future__ import annotations

import csv
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError, MissingFileError
from trainfer.integers import check_uint64_array
from trainfer.number_text import NumberTextError, parse_floats
from trainfer.serve.image_steps import WALKS, tiff_values
from trainfer.serve.preprocess import PreprocessSpec, as_tensor, check_numeric

#: The image files trainfer reads, by suffix, and the Pillow format each is decoded as. Decoding is
#: limited to these formats whatever a file's name says (Pillow picks a format from the bytes): an
#: upload holding PostScript would otherwise run Ghostscript, and one holding JPEG 2000 its decoder.
_IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
IMAGE_SUFFIXES = frozenset(_IMAGE_FORMATS)
IMAGE_FORMATS = tuple(sorted(set(_IMAGE_FORMATS.values())))
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_CSV_CHUNK_ROWS = 1024
#: CSV text is UTF-8; a byte-order mark before the header (as spreadsheet programs write) is dropped.
CSV_ENCODING = "utf-8-sig"
#: The largest image (width x height) trainfer decodes: 64 megapixels, e.g. 8000 x 8000. Larger
#: ones (decompression bombs: a small file claiming a huge size) are refused before decoding.
MAX_IMAGE_PIXELS = 64_000_000
#: Full-scale value of single-channel images deeper than 8 bits, by PIL mode (mapped to 255).
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
#: Peak bytes per pixel that decoding and converting one image takes before it is resized (peak
#: resident memory measured on 3000 x 3000 files, rounded up): at most 9 for 8-bit modes (PIL's
#: decoded image, up to 4 bytes a pixel, and its converted copy; CMYK to grayscale is the most), 24
#: for the modes deeper than 8 bits (the decoded image, float64 copies to check and scale its
#: values, then a float32 one: see :func:`_in_byte_units`). WEBP and CMYK images take up to 16 (a
#: serving process measured +978 MB for an 8000 x 8000 WEBP, +944 MB for a CMYK JPEG: their decoders
#: hold a second full copy while converting).
_DECODE_BYTES_PER_PIXEL = {"8-bit": 9, "WEBP or CMYK": 16, "deep": 24}
#: The most memory decoding one image may take: 576,000,000 bytes, 9 bytes for each of
#: :data:`MAX_IMAGE_PIXELS`, so that every 8-bit image within the pixel limit passes; a 16-bit or
#: float image may hold at most 24,000,000 pixels (e.g. 4800 x 5000). An image over it is refused
#: from its header, before decoding.
MAX_IMAGE_DECODE_BYTES = 576_000_000
#: The most chunks a PNG file may hold: 1024, plus one for each KiB of the file. Pillow reads every
#: chunk in Python (some 3 microseconds each): 600,000 empty ones (7 MB) took 1.5-2 s of CPU to
#: decode an 8x8 image. Real files hold a few chunks besides their image data, whose chunks
#: encoders write 8 KiB (libpng) to 64 KiB (Pillow) long. Every chunk up to ``IEND`` counts, the
#: frames of an animated PNG included. Counted from the chunks' headers before Pillow reads any.
MAX_PNG_CHUNKS = 1024
#: The most steps Pillow may take in Python to open a JPEG: 1024 marker segments, 0xFF fill bytes and
#: stray bytes before the image data, plus one for each KiB of the file. 600,000 empty comments (2.4 MB)
#: took 0.45 s of CPU, 1.2 MB of fill bytes 0.42 s; real files hold a few dozen segments.
MAX_JPEG_SEGMENTS = 1024
#: The most steps Pillow may take in Python to open a GIF: 1024 blocks, extension sub-blocks and stray
#: bytes before the first image, plus one for each KiB of the file. 600,000 comment extensions (3 MB)
#: took 0.31 s of CPU; real files hold a few extensions before their first image.
MAX_GIF_BLOCKS = 1024
#: The most entries (tags), rational values, and strips and tiles of an uncompressed file, the first
#: directory of a TIFF may declare: 1024, plus one for each KiB of the file. Pillow reads each entry, builds
#: each rational and each strip or tile, in Python: 600,000 one-row strips (3.6 MB) took 4.7 s of CPU, an
#: XResolution of 1,000,000 rationals (8 MB) 3.3 s. Real files declare a few dozen entries, a few rationals
#: and strips of 8 KiB or more.
MAX_TIFF_ENTRIES = 1024
#: The most values the numeric entries (every type but bytes, text and undefined) of a TIFF's first directory
#: may hold together: 1,048,576. Pillow decodes each entry it reads value by value in Python, some 0.06
#: microseconds a value: a BitsPerSample of 4,000,000 values (8 MB) took 0.23 s of CPU per request. Counted
#: from the entries' headers, the entries Pillow would not read too. Real files hold a few values per entry
#: but strip and tile offsets and byte counts, two per strip or tile: at most 128,007 in the files Pillow and
#: libtiff wrote on the development machine (64 megapixels in one-row strips), 500,000 for 16 x 16 tiles
#: (the smallest TIFF allows) over 64 megapixels.
MAX_TIFF_VALUES = 2**20
#: The most scans a JPEG may hold (its start-of-scan markers): libjpeg decodes each one over the whole
#: image, in C but without a limit of its own, so a progressive JPEG repeating a 12-byte scan thousands
#: of times (100 KB, 2000 x 2000) took 12.5 s of CPU. Encoders write 1 (baseline) to about 10
#: (libjpeg's progressive script), a few more when optimised.
MAX_JPEG_SCANS = 32
#: Bytes of a file read at a time when counting a JPEG's scans.
_SCAN_BLOCK = 1 << 20
#: For each format :mod:`trainfer.serve.image_steps` walks, the name of its limit (above) and what it counts.
_STEP_LIMITS = {
    "PNG": ("MAX_PNG_CHUNKS", "chunks"),
    "JPEG": ("MAX_JPEG_SEGMENTS", "marker segments, fill and stray bytes before its image data"),
    "GIF": ("MAX_GIF_BLOCKS", "blocks, sub-blocks and stray bytes before its first image"),
    "TIFF": ("MAX_TIFF_ENTRIES", "directory entries, rational values, strips and tiles"),
}
_NPY_MAGIC = b"\x93NUMPY"
#: The most elements a ``.npy`` input read into memory may hold: 2**30 (4 GiB of float32). Its
#: header is checked before any data is read; a header declaring more data than the file holds is
#: refused too (memory-mapped reads are bounded by the file itself).
MAX_NPY_ELEMENTS = 2**30
#: The most dimensions an input array may have: numpy 1.26's limit (numpy 2's is 64; an array of more cannot be
#: built), far more than any model's input (a manifest records at most 8).
MAX_DIMS = 32

__all__ = [
    "CSV_ENCODING",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "check_csv_fits",
    "check_npy_header",
    "check_regular_file",
    "MAX_IMAGE_DECODE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_GIF_BLOCKS",
    "MAX_JPEG_SCANS",
    "MAX_JPEG_SEGMENTS",
    "MAX_NPY_ELEMENTS",
    "MAX_PNG_CHUNKS",
    "MAX_TIFF_ENTRIES",
    "MAX_TIFF_VALUES",
    "MAX_DIMS",
    "check_buildable_shape",
    "column_indices",
    "iter_csv",
    "load_image",
    "load_npy",
    "npy_samples",
    "parse_row",
    "read_npy",
]


def load_npy(path: Path, spec: PreprocessSpec) -> Tensor:
    """A ``.npy`` array (never pickled objects: ``allow_pickle=False``) as a raw batch."""
    return as_tensor(read_npy(path, spec))


def read_npy(path: Path, spec: PreprocessSpec, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` file as a batch array ``(N, ...)`` (memory-mapped if ``mmap``), never unpickled.

    One sample of ``spec.input_shape`` gets its batch dimension. An empty, truncated or foreign
    file, a 0-d array and an array of 0 samples are errors naming the file and what was expected.
    """
    name = str(path)
    with open(path, "rb") as handle:
        check_npy_header(handle, name, os.fstat(handle.fileno()).st_size, mmap)
    return npy_samples(load_checked_npy(path, name, mmap), name, spec)


#: Held while numpy parses a ``.npy`` header: it reads the header's dict with ``ast.literal_eval``, and CPython
#: 3.11's compiler keeps its AST recursion depth in state every thread shares, so two parses at once can fail
#: with ``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905; met by two ``/predict``
#: uploads decoded on two threads). The lock makes one header parse at a time, a few microseconds each.
_NPY_HEADER_LOCK = threading.Lock()


def load_checked_npy(source: str | os.PathLike[str] | BinaryIO, name: str, mmap: bool = False) -> np.ndarray:
    """``np.load`` of the ``.npy`` file or bytes ``source`` whose header :func:`check_npy_header` passed (never
    unpickled; memory-mapped if ``mmap``), one header parse at a time (:data:`_NPY_HEADER_LOCK`); a file numpy
    cannot read is an :class:`InputError` naming ``name``."""
    try:
        with _NPY_HEADER_LOCK:
            return np.load(source, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"cannot read {name!r} as a .npy array: {error or 'truncated file'}") from None


def npy_samples(array: np.ndarray, name: str, spec: PreprocessSpec) -> np.ndarray:
    """``array`` (read from the ``.npy`` file ``name``) as a batch: numbers only, one sample of
    ``spec.input_shape`` gains its batch dimension; a 0-d array, no samples or samples of another
    shape than ``spec.input_shape`` is an :class:`InputError` naming the file and the array's shape,
    as are uint64 values above 2**63 - 1 (:func:`~trainfer.integers.check_uint64_array`)."""
    check_numeric(array.dtype, f"cannot read {name!r}: wrong dtype")
    expected = f"a batch (N, {', '.join(map(str, spec.input_shape))}) or one sample" if spec.input_shape else "a batch"
    if array.ndim == 0:
        raise InputError(f"{name!r} holds a 0-d array (one number): expected {expected} of shape {spec._shape_text()}")
    if spec.input_shape is not None and array.ndim == len(spec.input_shape):
        array = array[None]
    if len(array) == 0:
        raise InputError(f"{name!r} holds no samples (shape {array.shape}): expected at least one")
    try:
        spec._check_shape(array)  # type: ignore[arg-type]  # reads only ``.shape``
    except InputError as error:
        raise InputError(f"{name!r} holds an array of shape {array.shape}: {error}") from None
    check_uint64_array(array, f"uint64 file {name!r}")  # whole: its samples are read one at a time
    return array


def check_npy_header(handle: BinaryIO, name: str, size: int, mmap: bool = False) -> None:
    """Refuse the ``.npy`` file ``name`` from its header alone: not ``.npy``, not numbers, a negative dimension,
    or more data than it holds.

    ``handle`` is at the file's start and the file holds ``size`` bytes. The header's element count
    times the item size is checked against the bytes after the header before any array is built (a
    forged header claiming a huge shape would otherwise be allocated). Read into memory (not
    ``mmap``), the file may hold at most :data:`MAX_NPY_ELEMENTS` elements.
    """
    magic = handle.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        got = "an empty file (0 bytes)" if not magic else f"a file starting with {magic!r}"
        raise InputError(f"cannot read {name!r}: expected a .npy array (starting with {_NPY_MAGIC!r}), got {got}")
    version = tuple(handle.read(2))
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise InputError(f"cannot read {name!r} as a .npy array: format version {version}, expected (1, 0)/(2, 0)")
    try:
        with _NPY_HEADER_LOCK:
            shape, _, dtype = read_header[version](handle)
    except (ValueError, OSError, EOFError, SyntaxError):  # numpy's message may quote the parsed header's objects
        raise _malformed_header(name) from None
    if any(type(dimension) is not int for dimension in shape):  # numpy takes True for 1 (bool is an int)
        raise _malformed_header(name)
    if dtype.hasobject:
        raise InputError(
            f"cannot read {name!r} as a .npy array: it holds pickled Python objects, never loaded "
            "(allow_pickle=False): expected numbers"
        )
    check_numeric(dtype, f"cannot read {name!r}: wrong dtype")
    if any(dimension < 0 for dimension in shape):  # numpy's header reader lets them through; mmap then crashes
        raise InputError(f"{name!r} declares shape {shape}: expected dimensions >= 0 (a forged .npy header)")
    check_buildable_shape(shape, dtype.itemsize, repr(name))
    elements = math.prod(shape)
    available = size - handle.tell()
    if elements * dtype.itemsize > available:
        raise InputError(
            f"{name!r} declares shape {shape} of {dtype} ({elements * dtype.itemsize} bytes) but holds "
            f"{available} bytes of data: a truncated or forged .npy file"
        )
    if not mmap and elements > MAX_NPY_ELEMENTS:
        raise InputError(
            f"{name!r} holds {elements} elements (shape {shape}): expected at most {MAX_NPY_ELEMENTS} "
            "(trainfer.serve.readers.MAX_NPY_ELEMENTS) for a file read into memory"
        )


def check_buildable_shape(shape: Sequence[int], itemsize: int, what: str) -> None:
    """Refuse the declared ``shape`` (dimensions >= 0) of items of ``itemsize`` bytes that no array can take,
    with an :class:`InputError` naming ``what``: more than :data:`MAX_DIMS` dimensions, or non-zero dimensions
    whose product passes the largest array's bytes (2**63 - 1): numpy counts them even when a 0 makes the array
    empty (``(2**61, 0, 8, 8)``), so reshaping to such a shape fails, however few elements are given."""
    if len(shape) > MAX_DIMS:
        raise InputError(
            f"{what} declares a shape of {len(shape)} dimensions: expected at most {MAX_DIMS} (numpy's limit)"
        )
    nonzero = math.prod(dimension for dimension in shape if dimension)
    if nonzero * itemsize > np.iinfo(np.intp).max:
        raise InputError(
            f"{what} declares shape {tuple(shape)}: its non-zero dimensions hold {nonzero} elements of {itemsize} "
            "bytes, more than any array can (2**63 - 1 bytes), even an empty one: expected a smaller shape"
        )


def _malformed_header(name: str) -> InputError:
    """The error for the ``.npy`` file ``name`` whose header numpy cannot read, or whose shape is not integers."""
    return InputError(
        f"cannot read {name!r} as a .npy array: a malformed or truncated header (expected a dict of descr, "
        "fortran_order and shape, a tuple of integers)"
    )


def load_image(path: Path, spec: PreprocessSpec) -> Tensor:
    """An image file as a raw ``(C, H, W)`` float sample in ``[0, 1]`` (``pixel_scale`` times bytes).

    The channel count of ``spec.input_shape`` picks the mode (1: grayscale, 3: RGB or BGR, 4: RGBA);
    the image is resized (``spec.resample``, bilinear by default) to its height and width unless
    ``spec.resize`` is false. An image over :data:`MAX_IMAGE_PIXELS` pixels or whose decoding takes
    more than :data:`MAX_IMAGE_DECODE_BYTES` (:func:`_check_decode_bytes`), or a PNG, JPEG, GIF or TIFF
    file of more pieces than its limit allows (:func:`_check_steps`; a TIFF also of more values than
    :data:`MAX_TIFF_VALUES`), or one Pillow decodes in Python
    (:func:`_check_decoded_in_c`), is refused before decoding.
    ``path`` may also be a binary file object (an upload in memory), read from its start.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        _check_steps(path)
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            _check_pixels(image.width, image.height, path)
            _check_decode_bytes(image, path)
            _check_decoded_in_c(image, path)
            image.load()
            return _image_to_tensor(image, spec, path)
    except InputError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit (twice its warning size), checked when opening
        raise InputError(_too_large(path, f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}")) from None
    except UnidentifiedImageError:
        raise InputError(
            f"cannot read image {str(path)!r}: expected one of the formats {', '.join(IMAGE_FORMATS)} "
            "(recognised by the file's content, not its name)"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:  # ValueError: huge zTXt/iCCP chunks
        raise InputError(f"cannot read image {str(path)!r}: {error}") from None


def _check_steps(path: Path | BinaryIO) -> None:
    """Refuse a PNG, JPEG, GIF or TIFF file (at ``path``, or a file object read from its start and left
    there) whose opening takes Pillow more steps in Python (:mod:`trainfer.serve.image_steps`) than its
    format's limit (:data:`_STEP_LIMITS`) plus one per KiB of its bytes, a JPEG of more scans than
    :data:`MAX_JPEG_SCANS`, a TIFF of more values than :data:`MAX_TIFF_VALUES`; any other file passes."""
    if isinstance(path, str | os.PathLike):
        with open(path, "rb") as stream:
            _count_steps(stream, path)
    else:
        _count_steps(path, path)


def _count_steps(stream: BinaryIO, path: Path | BinaryIO) -> None:
    """:func:`_check_steps` of the file ``stream`` (named ``path``), left at its start. The walk stops once
    the count passes the limit, so it reads at most that many headers."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    head = stream.read(8)
    found = next((entry for prefix, entry in WALKS.items() if head.startswith(prefix)), None)
    if found is not None:
        fmt, walk = found
        name, what = _STEP_LIMITS[fmt]
        base = globals()[name]  # read at each call: a test may lower it
        limit, count = base + size // 1024, 0
        for steps in walk(stream, size):
            count += steps
            if count > limit:
                raise InputError(
                    f"{fmt} file {str(path)!r} holds more than {limit} {what}: expected at most {base} "
                    f"(trainfer.serve.readers.{name}) plus one per KiB of its {size} bytes"
                )
        if fmt == "JPEG":
            _check_jpeg_scans(stream, path)
        elif fmt == "TIFF":
            _check_tiff_values(stream, path, size)
    stream.seek(0)


def _check_tiff_values(stream: BinaryIO, path: Path | BinaryIO, size: int) -> None:
    """Refuse a TIFF whose first directory's numeric entries hold more than :data:`MAX_TIFF_VALUES` values
    (:func:`trainfer.serve.image_steps.tiff_values`, from the entries' headers)."""
    values = tiff_values(stream, size)
    if values > MAX_TIFF_VALUES:
        raise InputError(
            f"TIFF file {str(path)!r} holds {values} values in its first directory's numeric entries: expected at "
            f"most {MAX_TIFF_VALUES} (trainfer.serve.readers.MAX_TIFF_VALUES; Pillow decodes each in Python)"
        )


def _check_jpeg_scans(stream: BinaryIO, path: Path | BinaryIO) -> None:
    """Refuse a JPEG of more than :data:`MAX_JPEG_SCANS` start-of-scan markers (``FF DA``), counted over the
    whole file a block at a time (an ``FF DA`` inside a segment's data before the first scan counts too:
    a false refusal needs a crafted file; in the entropy-coded data ``FF`` is always followed by ``00``,
    a restart marker or a real marker)."""
    stream.seek(0)
    scans, last = 0, b""
    while block := stream.read(_SCAN_BLOCK):
        scans += (last + block).count(b"\xff\xda")
        last = block[-1:]  # an FF DA across two blocks, never one counted twice
        if scans > MAX_JPEG_SCANS:
            raise InputError(
                f"JPEG file {str(path)!r} holds more than {MAX_JPEG_SCANS} scans: expected at most "
                f"{MAX_JPEG_SCANS} (trainfer.serve.readers.MAX_JPEG_SCANS; libjpeg decodes each over the whole image)"
            )


def _check_pixels(width: int, height: int, path: Path) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(_too_large(path, f"{width}x{height} = {width * height}"))


#: Pillow's decoders written in Python, a step per pixel run (RLE4: per pixel), which no header bounds:
#: a 36 KB RLE4 BMP of 2000 x 2000 pixels took 0.22 s of CPU. Images they decode are refused.
PYTHON_DECODERS = frozenset({"bmp_rle"})


def _check_decoded_in_c(image: Any, path: Path) -> None:
    """Refuse an opened image that Pillow would decode in Python (:data:`PYTHON_DECODERS`: an RLE-compressed BMP)."""
    if any(tile[0] in PYTHON_DECODERS for tile in image.tile):
        raise InputError(
            f"cannot read image {str(path)!r}: an RLE-compressed {image.format} is not decoded (Pillow decodes it "
            "in Python, a pixel run at a time: a small file costs seconds of CPU); expected an uncompressed BMP "
            "or another of the formats " + ", ".join(IMAGE_FORMATS)
        )


def _check_decode_bytes(image: Any, path: Path) -> None:
    """Refuse an opened (not yet decoded) image whose decoding would take more than
    :data:`MAX_IMAGE_DECODE_BYTES`: its pixels (or a TIFF's largest declared tile or strip, if
    larger) times its kind's :data:`_DECODE_BYTES_PER_PIXEL`."""
    per_pixel = _DECODE_BYTES_PER_PIXEL[_decode_kind(image)]
    pixels, chunk = image.width * image.height, _tiff_chunk_pixels(image)
    needed = max(pixels, chunk) * per_pixel
    if needed > MAX_IMAGE_DECODE_BYTES:
        declared = f", declaring a tile or strip of {chunk} pixels" if chunk > pixels else ""
        raise InputError(
            f"image {str(path)!r} ({image.width}x{image.height} pixels of mode {image.mode}{declared}) takes "
            f"{needed} bytes to decode ({per_pixel} a pixel): expected at most {MAX_IMAGE_DECODE_BYTES} "
            "(trainfer.serve.readers.MAX_IMAGE_DECODE_BYTES)"
        )


def _tiff_chunk_pixels(image: Any) -> int:
    """The pixels of the largest tile or strip a TIFF declares (0 for other formats): its decoder
    allocates a whole declared tile, which may be far larger than the image (a 16 x 16 image
    declaring one 32768 x 32768 tile took 1 GB)."""
    if image.format != "TIFF":
        return 0
    tags = image.tag_v2
    tile = int(tags.get(322, 0) or 0) * int(tags.get(323, 0) or 0)  # TileWidth x TileLength
    strip = image.width * min(int(tags.get(278, 0) or 0), image.height)  # RowsPerStrip, at most the image
    return max(tile, strip)


def _decode_kind(image: Any) -> str:
    """Which of :data:`_DECODE_BYTES_PER_PIXEL` an opened image's decoding takes."""
    if image.mode in _FULL_SCALE:
        return "deep"
    return "WEBP or CMYK" if image.format == "WEBP" or image.mode == "CMYK" else "8-bit"


def _too_large(path: Path, pixels: str) -> str:
    return (
        f"image {str(path)!r} claims {pixels} pixels: expected at most {MAX_IMAGE_PIXELS} "
        "(trainfer.serve.readers.MAX_IMAGE_PIXELS; larger images are refused as possible decompression bombs)"
    )


def _image_to_tensor(image: Any, spec: PreprocessSpec, path: Path) -> Tensor:
    from PIL import Image

    shape = spec.input_shape
    if shape is not None and len(shape) != 3:
        raise InputError(f"image {str(path)!r} given, but the model expects samples of shape {shape}, not (C, H, W)")
    channels = shape[0] if shape is not None else (1 if image.mode in ("L", "1", *_FULL_SCALE) else 3)
    if channels not in _IMAGE_MODES:
        raise InputError(f"images convert to 1, 3 or 4 channels; the model expects {channels} (shape {shape})")
    deep = image.mode in _FULL_SCALE
    image = _in_byte_units(image, path) if deep else image.convert(_IMAGE_MODES[channels])
    if shape is not None and (image.height, image.width) != shape[1:]:
        if not spec.resize:
            raise InputError(
                f"image {str(path)!r} is {image.height}x{image.width}, expected {shape[1]}x{shape[2]} (resize is off)"
            )
        image = image.resize((shape[2], shape[1]), getattr(Image.Resampling, spec.resample.upper()))
    if deep:  # gray in byte units: repeated over the colour channels, alpha opaque
        gray = np.asarray(image, dtype=np.float32)
        planes = [gray] * min(channels, 3) + ([np.full_like(gray, 255.0)] if channels == 4 else [])
        array = np.stack(planes, axis=2)
    else:
        array = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels)
    if channels == 3 and spec.channel_order == "BGR":
        array = array[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)) * spec.pixel_scale)


def _in_byte_units(image: Any, path: Path) -> Any:
    """A 16-bit or float single-channel image as a float (mode ``F``) image scaled to ``0..255``.

    ``convert("L")`` would clip (65535 -> 255, 0.5 -> 0); here ``v * 255 / full_scale``, with the
    full scale of the mode (65535 for 16 bits, 1.0 for floats). Values outside ``0..full_scale``
    are refused: their scale is unknown.
    """
    from PIL import Image

    full = _FULL_SCALE[image.mode]
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (0 <= low and high <= full):  # also false for NaN
        raise InputError(
            f"image {str(path)!r} (mode {image.mode}) holds values in [{low:g}, {high:g}]: "
            f"expected 0..{full:g} ({'16-bit' if full != 1.0 else 'float intensities'})"
        )
    return Image.fromarray((values * (255.0 / full)).astype(np.float32))


def check_regular_file(path: Path, text: str | None = None) -> None:
    """Refuse an input ``path`` (named as ``text``) that is missing or, once links are followed, not a
    regular file (a FIFO, a device such as /dev/zero: reading either could block or never end)."""
    name = text if text is not None else str(path)
    if not path.exists():
        raise MissingFileError(f"input file not found: {name!r}")
    if not path.is_file():
        raise InputError(f"input {name!r} is not a regular file (a FIFO, a device or a socket): pass a file")


def check_csv_fits(spec: PreprocessSpec, name: str) -> None:
    """Refuse CSV input, before it is read, for a model whose samples are not rows of numbers: a CSV row is one
    sample of shape ``(F,)`` (a tabular model), never an image's ``(C, H, W)``."""
    if spec.input_shape is not None and len(spec.input_shape) != 1:
        raise InputError(
            f"cannot read CSV file {name!r} for this model: CSV rows are samples of shape (F,) (tabular models), "
            f"and it takes samples of shape {spec.input_shape}: send images or a .npy array"
        )


def iter_csv(path: Path, spec: PreprocessSpec, chunk_rows: int = _CSV_CHUNK_ROWS) -> Iterator[Tensor]:
    """Rows of a CSV file with a header, as raw ``(n, F)`` float64 chunks of at most ``chunk_rows``.

    ``spec.columns`` picks and orders the columns by name (a missing one is named in the error);
    without it every column is used in file order. A model whose samples are not rows is refused
    (:func:`check_csv_fits`).
    """
    check_csv_fits(spec, str(path))
    try:
        with open(path, newline="", encoding=CSV_ENCODING) as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise InputError(f"CSV file {str(path)!r} is empty: expected a header row of column names")
            indices = column_indices([h.strip() for h in header], spec, path)
            rows: list[list[float]] = []
            count = 0
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                rows.append(parse_row(row, indices, header, path, line))
                count += 1
                if len(rows) == chunk_rows:
                    yield torch.tensor(rows, dtype=torch.float64)
                    rows = []
            if rows:
                yield torch.tensor(rows, dtype=torch.float64)
            if not count:
                raise InputError(
                    f"CSV file {str(path)!r} has a header but no data rows: expected at least one row of "
                    f"{len(header)} values"
                )
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read CSV file {str(path)!r}: {error}") from None


def column_indices(header: list[str], spec: PreprocessSpec, path: Path) -> Sequence[int]:
    """The position of each of ``spec.columns`` in ``header``, in linear time: ``range(len(header))`` when they
    are all the columns in file order (or ``spec.columns`` is None; :func:`parse_row` then takes rows whole);
    a picked column missing from ``header``, or named there more than once, is an :class:`InputError`."""
    every = range(len(header))
    if spec.columns is None:
        return every
    positions: dict[str, int] = {}
    repeated: set[str] = set()
    for index, name in enumerate(header):
        if positions.setdefault(name, index) != index:
            repeated.add(name)
    ambiguous = [c for c in spec.columns if c in repeated]
    if ambiguous:
        raise InputError(
            f"CSV file {str(path)!r} names column(s) {_some(ambiguous)} more than once: expected each of "
            f"{_some(spec.columns)} once (which copy holds the values would be a guess)"
        )
    missing = [c for c in spec.columns if c not in positions]
    if missing:
        raise InputError(
            f"CSV file {str(path)!r} lacks column(s) {_some(missing)}: "
            f"expected {_some(spec.columns)}, got {_some(header)}"
        )
    picked = [positions[c] for c in spec.columns]
    return every if picked == list(every) else picked


def _some(names: Iterable[str], shown: int = 10) -> str:
    """At most ``shown`` of ``names`` as a list, with how many more there are."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def parse_row(row: list[str], indices: Sequence[int], header: list[str], path: Path, line: int) -> list[float]:
    """The cells ``indices`` of the CSV ``row`` (line ``line`` of ``path``) as numbers, each written in ASCII
    (:func:`trainfer.number_text.parse_floats`: ``١``, ``1_0`` and ``1\\xa0`` are refused); a row of another
    length than ``header``, or a cell that is not such a number, is an :class:`InputError` naming the line
    and the column."""
    if len(row) != len(header):
        raise InputError(
            f"CSV file {str(path)!r} line {line}: expected {len(header)} values (one per header column), got {len(row)}"
        )
    try:
        return parse_floats(row if indices == range(len(row)) else [row[i] for i in indices])
    except NumberTextError as error:
        column = header[indices[error.index]]
        raise InputError(f"CSV file {str(path)!r} line {line}, column {column!r}: {error}") from None
