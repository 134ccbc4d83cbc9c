"""Image input/output policy: what sgarc does to an input file before coding it, and back.

The codec codes 8-bit RGB pixels. :func:`load_image` turns any image file (or its bytes) into
an upright ``uint8`` RGB array plus an optional ``uint8`` alpha plane, and records in a
:class:`SourceInfo` what it did, so that decoding can give back what was put in. Nothing is
changed silently: every lossy step either raises :class:`~codec.errors.ImageError` by default
or was asked for by the caller.

Policy
------

Opening and size limit
    The file is opened lazily with Pillow and its declared ``width * height`` is checked
    *before* any pixel is decoded. Above ``max_pixels`` (default ``DEFAULT_MAX_PIXELS`` =
    100,000,000, so 24 MP photos pass) it raises ImageError("image is WxH = N pixels, above the
    limit of M pixels (decompression-bomb guard); pass a larger max_pixels / --max-pixels if
    this image is genuine"). Pillow's own decompression-bomb check is switched off while sgarc
    decodes (``Image.MAX_IMAGE_PIXELS = None``) so that this limit is the only one, and
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced to False so that truncated files are always
    refused. Both globals are set under a module lock and restored afterwards: decodes through
    this module are serialized within one process, and the previous values always come back.

Unreadable input
    An empty (0-byte) file, data that is no image format Pillow knows, a corrupt header and
    truncated or corrupt pixel data all raise ImageError naming the problem ("file is empty",
    "cannot identify image file", "image data is truncated or corrupt", ...). A path that
    cannot be read raises ImageError too. No Pillow error or OSError escapes, only MemoryError.
    EPS is refused (decoding it would run Ghostscript on the input). Animated or multi-page
    files (more than one frame) are refused, since coding only the first frame would lose the
    rest; MPO (the JPEG variant many cameras write) is the exception: its first frame is the
    photo and the others are previews or depth maps, so the first frame is coded.

Orientation
    The EXIF orientation tag (0x0112) is applied, as ``PIL.ImageOps.exif_transpose`` would,
    so pixels are stored upright; ``SourceInfo.orientation`` records the source's tag value.
    A missing, unreadable or out-of-range (not 1..8) tag counts as 1 and nothing is rotated.
    ``width`` and ``height`` are those of the upright image (the EXIF written back on
    decode says orientation 1: see codec.metadata).

Metadata policy (``metadata=``, ``name=``)
    EXIF, the ICC profile and XMP are taken from the source byte for byte, with provenance
    (format, file name, SHA-256 of the file's bytes), into ``PreparedImage.metadata``; the
    encoder stores them in the bitstream. Details, limits and what is not carried are in
    :mod:`codec.metadata`. No profile is applied: pixel values are coded as stored and the
    profile goes back on decode. A field over its limit raises ImageError under ``"keep"``
    (default) and is left out, recorded as dropped, under ``"drop-oversized"``; any other
    value raises ValueError. PNG text or ICC chunks that inflate beyond what Pillow would
    read (2 MiB while sgarc decodes) are found before Pillow sees the file: an XMP or ICC one
    follows the same policy, other text chunks (not carried anyway) are skipped, so such a
    file is never unreadable because of its metadata. ``name`` is the file name to record
    (default: the path's base name; none for bytes).

Modes (``SourceInfo.mode`` records Pillow's mode of the source)
    - ``RGB``: as is. ``RGBX``: the padding byte is dropped.
    - ``1``, ``L``: grayscale; ``rgb`` is the gray plane replicated to 3 channels and
      ``color`` is ``"L"``, so decoding gives back a grayscale image (``1`` becomes 0/255).
    - ``P``: converted to RGB (to RGBA when it has transparency, then the alpha policy
      applies); ``color`` is ``"RGB"`` even when the palette is all gray.
    - ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``: alpha policy below (premultiplied ``RGBa`` /
      ``La`` are un-premultiplied by Pillow first); ``LA`` and ``La`` are grayscale.
    - ``L`` or ``RGB`` with a PNG ``tRNS`` colour key: converted to ``LA`` / ``RGBA`` by
      Pillow (alpha 0 where the key matches), then the alpha policy applies.
    - ``CMYK``: converted to RGB with Pillow's naive formula (R = 255 - C - K, ...); ICC-managed
      conversion is a later issue. ``YCbCr``, ``LAB``, ``HSV``: converted to RGB by Pillow.
    - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I`` and ``F`` (more than 8 bits per
      sample): depth policy below; they are single-channel, so ``color`` is ``"L"``. A 16-bit
      gray ``tRNS`` key becomes an alpha plane (0 where the key matches).
    - 16-bit RGB, RGBA and gray+alpha PNGs, which Pillow opens as ``RGB`` / ``RGBA`` after
      silently keeping only the high byte of each sample, are detected from the PNG header
      (IHDR bit depth 16) and go through the depth policy too. With ``depth="reduce"`` their
      full 16-bit samples are decoded (high and low bytes, by decoding the data twice) and
      rounded as below; a 16-bit gray+alpha PNG has ``color`` ``"L"``. The same holds for
      uncompressed 16-bit RGB(A) TIFFs. Other files whose samples Pillow reduces to 8 bits
      itself (compressed 16-bit TIFF, SGI, 16-bit CMYK, PPM with maxval > 255) are detected
      from Pillow's raw mode and follow the depth policy as well, but ``depth="reduce"``
      keeps Pillow's own 8-bit values, which may differ from rounding by one level.
    - Any other mode raises ImageError naming it.

Alpha policy (``alpha=``)
    An alpha plane that is fully opaque (all 255) is always dropped, losslessly
    (``has_alpha`` False), whatever the policy. Otherwise:
    ``"keep"`` (default) carries the alpha plane losslessly beside the pixels (``alpha`` is
    returned, ``has_alpha`` True; colour values under alpha 0 are kept as stored);
    ``"flatten"`` composites over white, ``c' = round((c*a + 255*(255 - a)) / 255)``, and drops
    the alpha on purpose; ``"error"`` raises ImageError("image has an alpha channel; pass
    alpha='keep' or 'flatten'"). Any other value raises ValueError.

Depth policy (``depth=``)
    ``"error"`` (default) raises ImageError("image has 16-bit samples; sgarc codes 8-bit: pass
    depth='reduce' (--depth reduce) to accept the reduction") for any source with more than
    8 bits per sample (for ``F``: "image is a 32-bit floating-point image; sgarc takes 8- and
    16-bit integer images: ..."). ``"reduce"`` scales to 8 bits by rounding and records
    ``bit_depth`` 16: a 16-bit sample v becomes ``(v*255 + 32767) // 65535`` (that is,
    round(v / 257)); ``I`` (32-bit int) samples are clipped to 0..65535 first and treated as
    16-bit (Pillow already scales PGM files with other maxvals to that range); ``F`` (32-bit
    float) samples are taken on the 0..255 scale (the scale Pillow's own F-to-L conversion assumes):
    clipped to [0, 255], rounded half up, NaN becoming 0. A 16-bit alpha plane is reduced the
    same way before the alpha policy looks at it. Any other value raises ValueError.

Output
    :func:`to_pil` is the inverse mapping for decode: ``color "RGB"`` gives mode RGB (RGBA
    with alpha); ``color "L"`` gives mode L holding the mean of the three channels rounded to
    the nearest integer, ``(r + g + b + 1) // 3`` (LA with alpha). :func:`save_image` writes
    atomically: a temporary file in the destination's directory, flushed and fsynced, then
    ``os.replace``; the format comes from the extension unless given.

Sizes from 1x1 up are supported; :func:`pad_to_multiple` and :func:`crop` let the model see
sizes that are multiples of its downsampling factor.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from codec.errors import ImageError
from codec.files import atomic_file
from codec.metadata import (
    FIELD_LIMITS,
    METADATA_POLICIES,
    Metadata,
    check_file_name,
    extract,
    oversized_message,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PreparedImage",
    "SourceInfo",
    "crop",
    "gray_from_rgb",
    "load_image",
    "output_format",
    "output_pixels",
    "pad_to_multiple",
    "padded_batch",
    "save_image",
    "to_pil",
]

DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb limit; 24 MP photos must pass

ALPHA_POLICIES = ("keep", "flatten", "error")
DEPTH_POLICIES = ("error", "reduce")

_ALPHA_ERROR = "image has an alpha channel; pass alpha='keep' or 'flatten'"
_DEPTH_ERROR = (
    "image has 16-bit samples; sgarc codes 8-bit: pass depth='reduce' (--depth reduce) "
    "to accept the reduction"
)
# Pillow's "F": not a deeper integer image, so the 16-bit message would mislead.
_FLOAT_ERROR = (
    "image is a 32-bit floating-point image; sgarc takes 8- and 16-bit integer images: "
    "convert it, or pass depth='reduce' (--depth reduce) to code it as 8-bit with its "
    "samples read on the 0..255 scale (clipped)"
)

_GRAY_MODES = frozenset({"1", "L"})
_RGB_MODES = frozenset({"RGB", "RGBX"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_CONVERTED_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_SUPPORTED_MODES = (
    _GRAY_MODES | _RGB_MODES | _ALPHA_MODES | _CONVERTED_MODES | _HIGH_DEPTH_MODES | {"P"}
)

# Pillow raw modes that unpack 16-bit samples into an 8-bit image mode (keeping the high byte).
# "BGR;16" and friends are not here: they are 16 bits per *pixel* (5-6-5), i.e. 8-bit data.
_HIDDEN_16_PREFIXES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"})
# Raw modes whose byte-order twin, applied to the same data, yields the low byte of each sample.
_LOW_BYTE_TWIN = {
    "RGB;16B": "RGB;16L",
    "RGB;16L": "RGB;16B",
    "RGBA;16B": "RGBA;16L",
    "RGBA;16L": "RGBA;16B",
    "RGBX;16B": "RGBX;16L",
    "RGBX;16L": "RGBX;16B",
}
# Decoders whose args start with the raw mode and that unpack through Pillow's unpackers.
_TWIN_DECODERS = frozenset({"zip", "raw"})

# EXIF orientation -> array transform giving the upright image (same as exif_transpose).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}
_EXIF_ORIENTATION = 0x0112

# Pillow refuses a PNG whose iCCP / zTXt / compressed iTXt chunk inflates beyond
# PngImagePlugin.MAX_TEXT_CHUNK (1 MiB by default). While sgarc decodes it is raised to the
# largest metadata field limit, so that every profile sgarc can keep can be read; chunks above
# it are found first by _png_oversized and never reach Pillow.
_PNG_TEXT_LIMIT = max(FIELD_LIMITS.values())
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_XMP_KEYWORD = b"XML:com.adobe.xmp"

_PILLOW_LOCK = threading.Lock()


@dataclass(frozen=True)
class SourceInfo:
    """What the source was and what load_image did to it, so decode can give it back."""

    width: int  # after EXIF orientation is applied (pixels stored upright)
    height: int
    mode: str  # the source's Pillow mode, e.g. "RGB", "L", "P", "RGBA", "CMYK", "I;16"
    format: str | None  # Pillow's format name, e.g. "JPEG", "PNG"
    orientation: int  # EXIF orientation tag value of the source (1..8; 1 when absent)
    color: str  # "RGB" or "L": what decode gives back (grayscale stays grayscale)
    bit_depth: int  # 8, or 16 when the source had >8-bit samples and depth="reduce" was passed
    has_alpha: bool  # True when an alpha plane is carried (alpha="keep")


@dataclass
class PreparedImage:
    """The codec's input: upright 8-bit RGB pixels, an optional alpha plane, and provenance."""

    rgb: np.ndarray  # uint8 (H, W, 3), upright
    alpha: np.ndarray | None  # uint8 (H, W) when kept, else None
    info: SourceInfo
    metadata: Metadata | None = None  # EXIF, ICC, XMP and provenance (None: nothing known)


# --------------------------------------------------------------------------- loading


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    alpha: str = "keep",
    depth: str = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    metadata: str = "keep",
    name: str | None = None,
) -> PreparedImage:
    """Read an image file (path or bytes) into upright 8-bit RGB following the module policy.

    Raises ImageError for anything the policy refuses (too large, unreadable, alpha, depth or
    oversized metadata that needs the caller's consent); ValueError for an unknown ``alpha`` /
    ``depth`` / ``metadata`` value. ``name`` is the file name recorded for provenance
    (default: a path's base name).
    """
    if alpha not in ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {ALPHA_POLICIES}, not {alpha!r}")
    if depth not in DEPTH_POLICIES:
        raise ValueError(f"depth must be one of {DEPTH_POLICIES}, not {depth!r}")
    if metadata not in METADATA_POLICIES:
        raise ValueError(f"metadata must be one of {METADATA_POLICIES}, not {metadata!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, not {max_pixels!r}")

    opener, display = _make_opener(source)
    if name is None and not isinstance(source, bytes | bytearray | memoryview):
        name = os.path.basename(display) or None
    if name is not None:
        check_file_name(name)
    with _pillow_globals(), _open(opener, display, metadata) as src:
        return _prepare(src.im, src.fp, src.opener, display, alpha=alpha, depth=depth,
                        max_pixels=max_pixels, metadata=metadata, record_name=name,
                        sha256=src.sha256, dropped=src.dropped)


def _make_opener(source: Any) -> tuple[Callable[[], IO[bytes]], str]:
    """Return a function giving a fresh binary stream of the source, and a name for messages."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return (lambda: io.BytesIO(data)), "<bytes>"
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return (lambda: open(path, "rb")), path  # closed by the caller
    raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")


@contextlib.contextmanager
def _pillow_globals() -> Iterator[None]:
    """Make our max_pixels the only size limit and refuse truncated data; restore afterwards."""
    with _PILLOW_LOCK:
        saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
                 PngImagePlugin.MAX_TEXT_CHUNK)
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        PngImagePlugin.MAX_TEXT_CHUNK = max(saved[2], _PNG_TEXT_LIMIT)
        try:
            yield
        finally:
            (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
             PngImagePlugin.MAX_TEXT_CHUNK) = saved


@dataclass
class _Source:
    im: Image.Image
    fp: IO[bytes]
    opener: Callable[[], IO[bytes]]  # gives the bytes Pillow sees (oversized PNG chunks cut)
    sha256: bytes  # of the original file bytes
    dropped: tuple[str, ...]  # metadata fields cut before Pillow saw them


@contextlib.contextmanager
def _open(
    opener: Callable[[], IO[bytes]], name: str, metadata: str = "keep"
) -> Iterator[_Source]:
    """Open the source lazily (header only), converting every failure into ImageError.

    Hashes the file's bytes first, and cuts PNG metadata chunks Pillow would refuse to
    inflate (following the ``metadata`` policy for XMP and ICC ones).
    """
    try:
        fp = opener()
    except OSError as e:
        raise ImageError(f"cannot read {name}: {e.strerror or e}") from e
    try:
        try:
            empty = fp.seek(0, os.SEEK_END) == 0
            fp.seek(0)
            sha256 = hashlib.file_digest(fp, "sha256").digest()
            fp.seek(0)
            oversized = _png_oversized(fp)
            fp.seek(0)
        except OSError as e:
            raise ImageError(f"cannot read {name}: {e.strerror or e}") from e
        if empty:
            raise ImageError(f"cannot read {name}: file is empty (0 bytes)")
        dropped: set[str] = set()
        if oversized:
            for _, _, field in oversized:
                if field is not None and metadata == "keep":
                    raise ImageError(oversized_message(name, field, None))
                if field is not None:
                    dropped.add(field)
            try:
                data = _cut(fp.read(), oversized)
            except OSError as e:
                raise ImageError(f"cannot read {name}: {e.strerror or e}") from e
            fp.close()
            fp = io.BytesIO(data)
            opener = lambda: io.BytesIO(data)  # noqa: E731
        try:
            im = Image.open(fp)
        except UnidentifiedImageError as e:
            raise ImageError(
                f"cannot identify image file {name}: not an image in a format Pillow can read, "
                "or its header is corrupt"
            ) from e
        except MemoryError:
            raise
        except Exception as e:
            raise ImageError(f"cannot read image header of {name}: {_describe(e)}") from e
        with im:
            yield _Source(im, fp, opener, sha256, tuple(sorted(dropped)))
    finally:
        fp.close()


def _png_oversized(fp: IO[bytes]) -> list[tuple[int, int, str | None]]:
    """PNG text / ICC chunks that inflate beyond _PNG_TEXT_LIMIT: (start, end, field).

    ``field`` is "icc" or "xmp" for the chunks sgarc carries, None for other text. Returns []
    for anything that is not a PNG, and stops quietly at a truncated chunk (Pillow reports it).
    Only text and ICC chunks are read; the others are skipped over.
    """
    if fp.read(8) != _PNG_SIGNATURE:
        return []
    found: list[tuple[int, int, str | None]] = []
    pos = 8
    while True:
        head = fp.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        end = pos + 12 + length
        if kind in (b"iCCP", b"iTXt", b"zTXt", b"tEXt"):
            data = fp.read(length)
            if len(data) < length:
                break
            over, field = _png_chunk_over_limit(kind, data)
            if over:
                found.append((pos, end, field))
            fp.seek(4, os.SEEK_CUR)
        else:
            fp.seek(length + 4, os.SEEK_CUR)
        if kind == b"IEND":
            break
        pos = end
    return found


def _png_chunk_over_limit(kind: bytes, data: bytes) -> tuple[bool, str | None]:
    """(whether the chunk's text / profile exceeds the limit, the field it holds or None)."""
    keyword, _, rest = data.partition(b"\0")
    if kind == b"tEXt":
        return len(rest) > _PNG_TEXT_LIMIT, None
    if kind in (b"iCCP", b"zTXt"):
        return _inflates_beyond(rest[1:], _PNG_TEXT_LIMIT), "icc" if kind == b"iCCP" else None
    # iTXt: keyword \0 flag method language \0 translated keyword \0 text
    if len(rest) < 2:
        return False, None
    flag, text = rest[0], rest[2:].split(b"\0", 2)[-1]
    over = _inflates_beyond(text, _PNG_TEXT_LIMIT) if flag else len(text) > _PNG_TEXT_LIMIT
    return over, "xmp" if keyword == _XMP_KEYWORD else None


def _inflates_beyond(data: bytes, limit: int) -> bool:
    try:
        return len(zlib.decompressobj().decompress(data, limit + 1)) > limit
    except zlib.error:
        return False  # Pillow treats a corrupt profile or text as absent


def _cut(data: bytes, spans: list[tuple[int, int, str | None]]) -> bytes:
    """``data`` without the given byte spans (whole chunks)."""
    parts, pos = [], 0
    for start, end, _ in spans:
        parts.append(data[pos:start])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _pillow_call(name: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run a Pillow call that decodes pixels; any failure becomes an ImageError."""
    try:
        return fn()
    except (ImageError, MemoryError):
        raise
    except Exception as e:
        text = str(e).lower()
        kind = "truncated" if ("truncat" in text or isinstance(e, EOFError)) else "corrupt"
        raise ImageError(f"cannot {what} {name}: image data is {kind} ({_describe(e)})") from e


def _prepare(
    im: Image.Image,
    fp: IO[bytes],
    opener: Callable[[], IO[bytes]],
    name: str,
    *,
    alpha: str,
    depth: str,
    max_pixels: int,
    metadata: str = "keep",
    record_name: str | None = None,
    sha256: bytes | None = None,
    dropped: tuple[str, ...] = (),
) -> PreparedImage:
    width, height = im.size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {pixels} pixels, above the limit of {max_pixels} "
            "pixels (decompression-bomb guard); pass a larger max_pixels / --max-pixels if "
            "this image is genuine"
        )
    if pixels == 0:
        raise ImageError(f"cannot read {name}: image is {width}x{height}, it has no pixels")
    fmt = im.format
    mode = im.mode
    if fmt == "EPS":
        raise ImageError(
            f"cannot read {name}: EPS is not supported (decoding it runs Ghostscript); "
            "convert it to PNG first"
        )
    n_frames = _pillow_call(name, "read", lambda: getattr(im, "n_frames", 1))
    if n_frames > 1 and fmt != "MPO":
        raise ImageError(
            f"cannot code {name}: it has {n_frames} frames (animated or multi-page); sgarc "
            "codes a single still image: extract the frame you want first"
        )
    if mode not in _SUPPORTED_MODES:
        raise ImageError(
            f"cannot code {name}: unsupported image mode {mode!r} (sgarc reads 1, L, P, RGB, "
            "RGBA, LA, PA, CMYK, YCbCr, LAB, HSV and 16-bit / 32-bit single-channel images)"
        )
    hidden_16 = mode not in _HIGH_DEPTH_MODES and _has_hidden_high_depth(im, fp)
    high_depth = mode in _HIGH_DEPTH_MODES or hidden_16
    if high_depth and depth == "error":
        raise ImageError(_FLOAT_ERROR if mode == "F" else _DEPTH_ERROR)

    # Pillow clears im.tile once the pixels are loaded; the 16-bit re-decode needs it.
    tiles = list(getattr(im, "tile", None) or [])
    _pillow_call(name, "decode", im.load)
    orientation = _orientation(im)
    # After load: a PNG's chunks after the image data (often eXIf) are read by load().
    meta = extract(im, sha256=sha256, name=record_name, policy=metadata, dropped=dropped,
                   display=name)

    color, planes, alpha_plane = None, None, None
    if hidden_16:
        wide = (_decode_png16(im, opener, name) if fmt == "PNG" else None) or _decode_wide(
            im, tiles, opener, name)
        if wide is not None:
            color, planes, alpha_plane = wide
    upright = False
    if planes is None and im.mode in ("RGB", "L") and "transparency" not in im.info:
        # the common case (8-bit RGB or gray, no alpha): copied upright straight from
        # Pillow's buffer, band by band, with no full-size intermediate copy (10 -> 7 bytes
        # per pixel at the peak for RGB: Pillow's 4 and the array's 3); the same values as
        # _to_planes and the transform below give
        color = "RGB" if im.mode == "RGB" else "L"
        planes, upright = _upright_copy(im, orientation, name), True
    if planes is None:
        color, planes, alpha_plane = _to_planes(im, name)

    if alpha_plane is not None and bool(np.all(alpha_plane == 255)):
        alpha_plane = None  # fully opaque: dropping it loses nothing
    if alpha_plane is not None:
        if alpha == "error":
            raise ImageError(_ALPHA_ERROR)
        if alpha == "flatten":
            planes = _flatten_over_white(planes, alpha_plane)
            alpha_plane = None

    transform = _ORIENT[orientation]
    # Own, writable, C-contiguous arrays (np.asarray of a Pillow image is read-only).
    if not upright:
        planes = np.require(transform(planes), requirements=["C", "W"])
    if alpha_plane is not None:
        alpha_plane = np.require(transform(alpha_plane), requirements=["C", "W"])
    rgb = planes if planes.ndim == 3 else np.repeat(planes[:, :, None], 3, axis=2)

    info = SourceInfo(
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        mode=mode,
        format=fmt,
        orientation=orientation,
        color=color,
        bit_depth=16 if high_depth else 8,
        has_alpha=alpha_plane is not None,
    )
    return PreparedImage(rgb=rgb, alpha=alpha_plane, info=info, metadata=meta)


# Pillow tiles are (codec_name, extents, offset, args); a NamedTuple in recent Pillow, a plain
# tuple in older versions, so they are indexed rather than accessed by name.


def _tile_rawmode(tile: Any) -> str | None:
    args = tile[3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _has_hidden_high_depth(im: Image.Image, fp: IO[bytes]) -> bool:
    """True when Pillow opened >8-bit samples as an 8-bit mode (it keeps only 8 bits)."""
    if im.format == "PNG":
        head = _read_head(fp, 26)
        # signature (8) + chunk length (4) + b"IHDR" (4) + width (4) + height (4) + bit depth
        if len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16:
            return True
    for tile in getattr(im, "tile", None) or []:
        rawmode = _tile_rawmode(tile)
        if rawmode and ";" in rawmode:
            prefix, _, suffix = rawmode.partition(";")
            if prefix in _HIDDEN_16_PREFIXES and suffix in ("16", "16B", "16L", "16N"):
                return True
        codec_name, args = tile[0], tile[3]
        if (
            codec_name in ("ppm", "ppm_plain")
            and isinstance(args, tuple)
            and len(args) >= 2
            and isinstance(args[1], int)
            and args[1] > 255
        ):
            return True  # PPM/PGM with maxval > 255 opened as 8-bit RGB
    return False


def _read_head(fp: IO[bytes], n: int) -> bytes:
    pos = fp.tell()
    try:
        fp.seek(0)
        return fp.read(n)
    finally:
        fp.seek(pos)


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block is treated as absent
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8:
        return value
    return 1


def _reduce16(v: np.ndarray) -> np.ndarray:
    """Round 16-bit samples to 8 bits: (v*255 + 32767) // 65535."""
    w = v.astype(np.uint32)
    w *= 255
    w += 32767
    w //= 65535
    return w.astype(np.uint8)


def _key_alpha(values: np.ndarray, key: Any) -> np.ndarray | None:
    """Alpha plane (0 where the colour key matches, else 255) for a tRNS colour key."""
    if isinstance(key, int) and values.ndim == 2:
        match = values == key
    elif isinstance(key, tuple) and values.ndim == 3 and len(key) == values.shape[2]:
        match = np.all(values == np.asarray(key, dtype=values.dtype), axis=2)
    else:
        return None
    return np.where(match, 0, 255).astype(np.uint8)


def _decode_twin(
    im: Image.Image,
    tiles: list[Any],
    opener: Callable[[], IO[bytes]],
    name: str,
    rawmodes: dict[str, str],
) -> np.ndarray | None:
    """Decode the source again with each tile's raw mode replaced; None if that is impossible."""
    new_tiles = []
    for tile in tiles:
        rawmode = _tile_rawmode(tile)
        if tile[0] not in _TWIN_DECODERS or rawmode not in rawmodes:
            return None
        args = tile[3]
        new_args = rawmodes[rawmode] if isinstance(args, str) else (rawmodes[rawmode], *args[1:])
        new_tiles.append(
            type(tile)(*tile[:3], new_args) if hasattr(tile, "_fields") else (*tile[:3], new_args)
        )
    if not new_tiles:
        return None

    def decode() -> np.ndarray:
        with opener() as fp2, Image.open(fp2) as im2:
            if im2.size != im.size or im2.mode != im.mode or len(im2.tile) != len(new_tiles):
                raise ImageError(f"cannot decode {name}: file changed while it was being read")
            im2.tile = new_tiles
            im2.load()
            return np.asarray(im2)

    return _pillow_call(name, "decode", decode)


def _decode_png16(
    im: Image.Image, opener: Callable[[], IO[bytes]], name: str
) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """A 16-bit PNG decoded once at full precision by imagecodecs (libpng), reduced by
    rounding; like _to_planes' (color, planes, alpha). None where imagecodecs is missing
    (the GPU image): _decode_wide then decodes twice, through Pillow."""
    try:
        import imagecodecs
    except ImportError:
        return None
    if not imagecodecs.PNG.available or im.info.get("interlace"):
        return None  # Adam7: imagecodecs' libpng call warns on stderr; Pillow decodes it
    with opener() as fp:
        data = fp.read()
    wide = _pillow_call(name, "decode", lambda: imagecodecs.png_decode(data))
    if wide.dtype != np.uint16 or wide.ndim != 3 or wide.shape[:2] != im.size[::-1]:
        return None
    if wide.shape[2] == 2:  # gray + alpha
        return "L", _reduce16(wide[:, :, 0]), _reduce16(wide[:, :, 1])
    rgb = wide[:, :, :3]
    if wide.shape[2] == 4:
        return "RGB", _reduce16(rgb), _reduce16(wide[:, :, 3])
    key = im.info.get("transparency")
    return "RGB", _reduce16(rgb), None if key is None else _key_alpha(rgb, key)


def _decode_wide(
    im: Image.Image, tiles: list[Any], opener: Callable[[], IO[bytes]], name: str
) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """Full-precision decode of 16-bit samples Pillow opened as 8-bit, reduced by rounding.

    Returns (color, planes, alpha) like _to_planes, or None when only Pillow's 8-bit values
    can be had (the caller then uses those).
    """
    rawmodes = {_tile_rawmode(t) for t in tiles}
    if rawmodes == {"LA;16B"} and im.mode == "RGBA":
        # 16-bit gray+alpha PNG: the 8-bit RGBA raw mode hands over all four bytes of a pixel.
        raw = _decode_twin(im, tiles, opener, name, {"LA;16B": "RGBA"})
        if raw is None:
            return None
        raw = raw.astype(np.uint16)
        gray = (raw[:, :, 0] << 8) | raw[:, :, 1]
        alpha16 = (raw[:, :, 2] << 8) | raw[:, :, 3]
        return "L", _reduce16(gray), _reduce16(alpha16)
    if len(rawmodes) != 1 or next(iter(rawmodes)) not in _LOW_BYTE_TWIN:
        return None
    low = _decode_twin(im, tiles, opener, name, _LOW_BYTE_TWIN)
    if low is None:
        return None
    high = np.asarray(im)
    wide = (high.astype(np.uint16) << 8) | low
    color_planes, alpha16 = wide[:, :, :3], (wide[:, :, 3] if im.mode == "RGBA" else None)
    if alpha16 is None and "transparency" in im.info:
        return "RGB", _reduce16(color_planes), _key_alpha(color_planes, im.info["transparency"])
    return "RGB", _reduce16(color_planes), None if alpha16 is None else _reduce16(alpha16)


# The inverse of each _ORIENT transform (6 and 8 are each other's; the others undo
# themselves).
_UNORIENT = {o: _ORIENT[{6: 8, 8: 6}.get(o, o)] for o in _ORIENT}
_COPY_ROWS = 1 << 20  # pixels per band of _upright_copy


def _upright_copy(im: Image.Image, orientation: int, name: str) -> np.ndarray:
    """np.asarray(im) with the orientation's transform applied, as an own, writable,
    C-contiguous array, made band by band of rows: each band is written through the
    inverse transform's view of the output, so no full-size copy exists besides it."""
    width, height = im.size
    channels = len(im.getbands())
    shape = (height, width) if channels == 1 else (height, width, channels)
    # orientations 5..8 turn the image a quarter: width and height trade places
    upright = np.empty((width, height, *shape[2:]) if orientation >= 5 else shape, np.uint8)
    source = _UNORIENT[orientation](upright)  # source[r, c] is where pixel (r, c) goes
    rows = max(1, _COPY_ROWS // width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        band = _pillow_call(name, "read", lambda t=top, b=bottom: im.crop((0, t, width, b)))
        source[top:bottom] = np.asarray(band)
    return upright


def _to_planes(im: Image.Image, name: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Map a loaded image to (color, planes, alpha): planes uint8 (H, W) gray or (H, W, 3)."""
    mode = im.mode
    keyed = "transparency" in im.info

    def convert(to: str) -> Image.Image:
        return _pillow_call(name, "convert", lambda: im.convert(to))

    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im)
        wide = np.clip(values, 0, 65535).astype(np.uint16) if mode == "I" else values
        key_alpha = _key_alpha(values, im.info["transparency"]) if keyed else None
        return "L", _reduce16(wide), key_alpha
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        return "L", np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8), None
    if mode in _GRAY_MODES:
        if keyed:
            la = np.asarray(convert("LA"))
            return "L", la[:, :, 0], la[:, :, 1]
        return "L", np.asarray(im if mode == "L" else convert("L")), None
    if mode in ("LA", "La"):
        la = np.asarray(im if mode == "LA" else convert("LA"))
        return "L", la[:, :, 0], la[:, :, 1]
    if mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and keyed):
        rgba = np.asarray(im if mode == "RGBA" else convert("RGBA"))
        return "RGB", rgba[:, :, :3], rgba[:, :, 3]
    if mode == "RGB":
        return "RGB", np.asarray(im), None
    # P, RGBX, CMYK, YCbCr, LAB, HSV
    return "RGB", np.asarray(convert("RGB")), None


def _flatten_over_white(planes: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite over white: round((c*a + 255*(255 - a)) / 255), in integers."""
    a = alpha.astype(np.uint32)
    if planes.ndim == 3:
        a = a[:, :, None]
    out = planes.astype(np.uint32) * a + 255 * (255 - a) + 127
    return (out // 255).astype(np.uint8)


# --------------------------------------------------------------------------- output


def gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """The decoded gray plane of a grayscale source: the rounded channel mean."""
    return ((rgb.astype(np.uint16).sum(axis=2) + 1) // 3).astype(np.uint8)


def output_pixels(rgb: np.ndarray, color: str) -> np.ndarray:
    """The pixel values a decode hands back for `color` (what PSNR is measured on)."""
    return gray_from_rgb(rgb) if color == "L" else rgb


def to_pil(rgb: np.ndarray, color: str = "RGB", alpha: np.ndarray | None = None) -> Image.Image:
    """Turn decoded pixels back into the image the source was: RGB/RGBA or L/LA.

    For ``color="L"`` the gray value is the rounded mean of the three channels,
    ``(r + g + b + 1) // 3``, so a gray source comes back exactly.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.dtype != np.uint8 or alpha.shape != rgb.shape[:2]:
            raise ValueError(
                f"alpha must be uint8 {rgb.shape[:2]}, got {alpha.dtype} {alpha.shape}"
            )
    if color == "L":
        plane = gray_from_rgb(rgb)
        arr = plane if alpha is None else np.dstack([plane, alpha])
    elif color == "RGB":
        arr = rgb if alpha is None else np.dstack([rgb, alpha])
    else:
        raise ValueError(f"color must be 'RGB' or 'L', not {color!r}")
    return Image.fromarray(np.ascontiguousarray(arr))


def output_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The Pillow format an output path gets: ``fmt`` if given, else from the extension."""
    return _format_for(os.fspath(path), fmt)


def _format_for(path: str, fmt: str | None) -> str:
    Image.init()
    if fmt is None:
        ext = os.path.splitext(path)[1].lower()
        fmt = Image.registered_extensions().get(ext)
        if fmt is None:
            raise ImageError(
                f"cannot tell the image format from the name {path!r}; use an extension such "
                "as .png, .jpg or .webp, or pass a format"
            )
    fmt = fmt.upper()
    if fmt not in Image.SAVE:
        raise ImageError(f"cannot write image format {fmt!r}: Pillow has no writer for it")
    return fmt


def save_image(
    img: Image.Image, path: str | os.PathLike[str], format: str | None = None, **params: Any
) -> None:
    """Write ``img`` atomically: a reader sees the old file or the complete new one, never half.

    The format comes from the extension unless ``format`` is given; ``params`` go to Pillow's
    ``save`` (e.g. ``quality``). The temporary file lives in the destination's directory, is
    fsynced, and is then renamed over ``path``; it is removed if anything fails.
    """
    path = os.fspath(path)
    fmt = _format_for(path, format)
    with atomic_file(path) as f:
        try:
            img.save(f, format=fmt, **params)
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise  # a real I/O failure (disk full, ...), not an encoder refusal
            raise ImageError(
                f"cannot write a mode {img.mode} image as {fmt}: {_describe(e)}"
            ) from e


# --------------------------------------------------------------------------- padding


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad (H, W[, C]) at the bottom/right by edge replication so H and W divide ``multiple``.

    The model downsamples by a fixed factor; replicated edges cost fewer bits than zeros.
    Returns ``x`` itself when no padding is needed.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, not {multiple!r}")
    if x.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {x.shape}")
    h, w = x.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, ph), (0, pw)) + ((0, 0),) * (x.ndim - 2), mode="edge")


def padded_batch(images: Sequence[np.ndarray], multiple: int) -> np.ndarray:
    """(B, Hp, Wp, C) batch of (H, W, C) images of one padded size, each padded at the
    bottom/right by edge replication as `pad_to_multiple` does, written in place.

    One copy per image instead of two (padding, then stacking); a single image that needs
    no padding is not copied at all (the batch is a view of it).
    """
    if not images:
        raise ValueError("padded_batch needs at least one image")
    h, w = images[0].shape[:2]
    hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if len(images) == 1 and (hp, wp) == (h, w):
        return images[0][None]
    out = np.empty((len(images), hp, wp, *images[0].shape[2:]), images[0].dtype)
    for dst, x in zip(out, images, strict=True):
        h, w = x.shape[:2]
        if (-(-h // multiple) * multiple, -(-w // multiple) * multiple) != (hp, wp):
            raise ValueError(f"image of shape {x.shape} does not pad to {hp}x{wp}")
        dst[:h, :w] = x
        dst[h:, :w] = x[h - 1:h]  # rows below: the last row
        dst[:, w:] = dst[:, w - 1:w]  # columns to the right: the last column, corner included
    return out


def crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of pad_to_multiple: the top-left ``height`` x ``width`` region (a view)."""
    if not (0 < height <= x.shape[0] and 0 < width <= x.shape[1]):
        raise ValueError(f"cannot crop shape {x.shape} to {height}x{width}")
    return x[:height, :width]
