"""The steps Pillow takes in Python to open an image: what :mod:`trainfer.serve.readers` bounds before Pillow runs.

Pillow reads some formats' structure one piece at a time in Python, a few microseconds a piece whatever
its size, so a file of hundreds of thousands of empty pieces costs seconds of CPU to open. Each walker
here follows the lengths Pillow follows, reading only headers and lengths, and yields how many steps
each piece costs it (usually 1), in Pillow's order, up to where Pillow's Python walk ends (a decoder
in C reads the rest). A walker stops where the file ends or a length points past it: Pillow, following
the same lengths, then finds the file truncated. :data:`WALKS` picks the walker by the file's first bytes.
:func:`tiff_values` counts the values of a TIFF's numeric entries, which Pillow decodes one at a time.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

#: A walker: given a file (at any position) and its size, the steps Pillow takes opening it.
Walk = Callable[[BinaryIO, int], Iterator[int]]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG markers that carry no length (Pillow's ``MARKER`` entries without a handler).
_JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_JPEG_START_OF_SCAN = 0xDA
_GIF_COMMENT = 0xFE
_TIFF_OFFSET_TAGS = (273, 324)  # StripOffsets, TileOffsets: Pillow builds a Python tile for each value
_TIFF_COMPRESSION, _TIFF_UNCOMPRESSED, _TIFF_SHORT = 259, 1, 3  # the Compression tag, its value "none", a type
_TIFF_RATIONALS = (5, 10)  # RATIONAL, SRATIONAL: Pillow builds a Python IFDRational for each value it reads
#: The bytes a value of each numeric TIFF type takes (every type but BYTE, ASCII and UNDEFINED, which Pillow
#: keeps whole as one ``bytes`` or ``str``): SHORT, LONG, RATIONAL, SBYTE, SSHORT, SLONG, SRATIONAL, FLOAT,
#: DOUBLE, IFD, and BigTIFF's LONG8, SLONG8, IFD8. Pillow decodes such an entry value by value in Python.
_TIFF_VALUE_BYTES = {3: 2, 4: 4, 5: 8, 6: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


def png_steps(stream: BinaryIO, size: int) -> Iterator[int]:
    """One step per chunk up to ``IEND`` (each frame of an animated PNG too), from the chunks' 8-byte headers."""
    position = len(PNG_SIGNATURE)
    while position + 8 <= size:
        stream.seek(position)
        length, kind = struct.unpack(">I4s", stream.read(8))
        yield 1
        if kind == b"IEND":
            return
        position += 12 + length  # header, data, CRC


def jpeg_steps(stream: BinaryIO, size: int) -> Iterator[int]:
    """One step per marker segment, 0xFF fill byte and stray byte after the start-of-image marker, up to the
    start of scan (after which libjpeg reads the file), as ``JpegImageFile._open`` walks them."""
    stream.seek(2)
    byte = stream.read(1)
    while byte:
        yield 1
        if byte != b"\xff":  # a stray byte: Pillow skips it alone
            byte = stream.read(1)
            continue
        marker = stream.read(1)
        if marker == b"\xff":  # a fill byte
            continue
        if not marker or marker[0] == _JPEG_START_OF_SCAN or 0 < marker[0] < 0xC0:  # 0x01-0xBF: Pillow gives up
            return
        if marker[0] >= 0xC0 and marker[0] not in _JPEG_MARKERS_WITHOUT_LENGTH:
            length = stream.read(2)
            if len(length) < 2:
                return
            stream.seek(max(int.from_bytes(length, "big") - 2, 0), os.SEEK_CUR)
        byte = stream.read(1)


def gif_steps(stream: BinaryIO, size: int) -> Iterator[int]:
    """One step per block introducer or stray byte and per extension sub-block, up to the first image
    (whose data a decoder in C reads), as ``GifImageFile._seek(0)`` walks them."""
    stream.seek(10)
    flags = stream.read(3)[:1]
    if flags and flags[0] & 128:
        stream.seek(3 << ((flags[0] & 7) + 1), os.SEEK_CUR)  # the global palette
    while True:
        yield 1
        introducer = stream.read(1)
        if introducer in (b"", b";", b","):  # end, trailer, image descriptor
            return
        if introducer == b"!":
            yield from _gif_extension_steps(stream, stream.read(1))


def _gif_extension_steps(stream: BinaryIO, label: bytes) -> Iterator[int]:
    """The sub-blocks Pillow reads after an extension's ``label``: the first, then up to an empty one,
    except after an empty first one of a comment."""
    yield 1
    if not _gif_sub_block(stream) and label == bytes([_GIF_COMMENT]):
        return
    while True:
        yield 1
        if not _gif_sub_block(stream):
            return


def _gif_sub_block(stream: BinaryIO) -> bool:
    """Skip one sub-block; whether it held data (``False``: a terminator, or the file's end)."""
    length = stream.read(1)
    if not length or not length[0]:
        return False
    stream.seek(length[0], os.SEEK_CUR)
    return True


def tiff_steps(stream: BinaryIO, size: int) -> Iterator[int]:
    """The first directory's entries (Pillow reads each in Python), the values of its rational entries (one
    Python object each: an 8 MB XResolution took 3.3 s of CPU), then, in an uncompressed file, the values of its
    strip and tile offsets (Pillow builds a Python tile for each; libtiff reads a compressed file's strips in
    C), from the directory alone; classic and BigTIFF files."""
    directory = _tiff_directory(stream)
    if directory is None:
        return
    order, entry, entries = directory
    yield entries
    compression, tiles = _TIFF_UNCOMPRESSED, 0
    for tag, kind, values, field in _tiff_entries(stream, entry, entries):
        if kind in _TIFF_RATIONALS:
            yield values
        if tag in _TIFF_OFFSET_TAGS:
            tiles += values
        elif tag == _TIFF_COMPRESSION and values:
            compression = struct.unpack_from(order + ("H" if kind == _TIFF_SHORT else "I"), field)[0]
    if compression == _TIFF_UNCOMPRESSED:
        yield tiles


def tiff_values(stream: BinaryIO, size: int) -> int:
    """How many values the first directory's numeric entries hold (:data:`_TIFF_VALUE_BYTES`: Pillow decodes
    each entry it reads value by value in Python, about 0.06 microseconds a value), counted from the entries'
    headers (tag, type, count) for every such entry whose values fit in the file (Pillow skips the others);
    classic and BigTIFF files. Read once :func:`tiff_steps` has bounded the number of entries."""
    directory = _tiff_directory(stream)
    if directory is None:
        return 0
    _, entry, entries = directory
    counted = (
        count
        for _, kind, count, _ in _tiff_entries(stream, entry, entries)
        if kind in _TIFF_VALUE_BYTES and count * _TIFF_VALUE_BYTES[kind] <= size
    )
    return sum(counted)


def _tiff_directory(stream: BinaryIO) -> tuple[str, str, int] | None:
    """A TIFF's byte order (``"<"`` or ``">"``), the struct format of its entries (classic or BigTIFF) and the
    number of entries its first directory declares, the stream left at the first entry; ``None`` when the
    file ends first."""
    stream.seek(0)
    head = stream.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = 0x2B in head[2:4]
    offset, count, entry = ("Q", "Q", "HHQ8s") if big else ("I", "H", "HHI4s")
    start = head[8:16] if big else head[4:8]
    if len(start) < struct.calcsize(offset):
        return None
    stream.seek(struct.unpack(order + offset, start)[0])
    raw = stream.read(struct.calcsize(count))
    if len(raw) < struct.calcsize(count):
        return None
    return order, order + entry, struct.unpack(order + count, raw)[0]


def _tiff_entries(stream: BinaryIO, entry: str, entries: int) -> Iterator[tuple[int, int, int, bytes]]:
    """The (tag, type, count, value or offset) of the ``entries`` directory entries of struct format ``entry``
    at the stream's position, as many as the file holds."""
    width = struct.calcsize(entry)
    table = stream.read(entries * width)
    return struct.iter_unpack(entry, table[: len(table) - len(table) % width])


#: The walker of each format whose opening costs Pillow a step per piece, by the file's first bytes
#: (the prefixes Pillow recognises the format by). WEBP and BMP are not here: libwebp walks a WEBP's
#: chunks in C, and a BMP's headers are fixed fields (its RLE data, decoded in Python, is not bounded).
WALKS: dict[bytes, tuple[str, Walk]] = {
    PNG_SIGNATURE: ("PNG", png_steps),
    b"\xff\xd8\xff": ("JPEG", jpeg_steps),
    b"GIF87a": ("GIF", gif_steps),
    b"GIF89a": ("GIF", gif_steps),
    **{prefix: ("TIFF", tiff_steps) for prefix in (b"MM\0*", b"II*\0", b"MM*\0", b"II\0*", b"MM\0+", b"II+\0")},
}
