"""Everything a photo carries besides its pixels: what sgarc keeps, how, and how it goes back.

An archive that recompresses photos must not lose the date a photo was taken, the camera, the
GPS position, the colour profile or the captions. This module owns that: taking the metadata
out of a source image (:func:`extract`, called by ``codec.images.load_image``), the ``META``
record of the bitstream (:meth:`Metadata.pack` / :func:`unpack`; byte layout in
docs/bitstream.md), and writing it back into a decoded file (:func:`save_params`).

What is kept
    ``exif``: the EXIF block, byte for byte as in the source: the TIFF structure from its
    byte-order mark (``II*\\0`` / ``MM\\0*``) on. JPEG's APP1 ``Exif\\0\\0`` identifier is a
    container marker, not EXIF data, so it is not stored (PNG ``eXIf`` and WebP ``EXIF``
    chunks hold the TIFF structure directly; a leading ``Exif\\0\\0`` is removed once, whatever
    the container). ``icc``: the ICC profile, byte for byte. ``xmp``: the XMP packet, byte for
    byte (JPEG APP1 ``http://ns.adobe.com/xap/1.0/``, PNG iTXt ``XML:com.adobe.xmp`` inflated,
    WebP ``XMP``, TIFF tag 700). Provenance: the source's format (Pillow's name, e.g.
    ``JPEG``), its file name (UTF-8, no directory) and the SHA-256 of the original file bytes.
    Malformed EXIF or ICC data is kept as it is (it is bytes to us; never parsed at encode).

    Not carried: PNG text chunks other than XMP, JPEG comments, IPTC (Photoshop APP13), DPI,
    PNG gAMA/cHRM/sRGB/cICP, extended (multi-segment) JPEG XMP, and EXIF of TIFF sources (TIFF
    keeps EXIF inside its own IFD structure, not as a block that could be copied).

Limits and the metadata policy (``metadata=`` / ``--metadata``)
    Per field: EXIF 1 MiB (a JPEG APP1 segment holds 64 KiB, but PNG and WebP can carry more),
    ICC 2 MiB (matrix profiles are a few KiB, LUT-based RGB profiles hundreds, CMYK press
    profiles up to about 2 MiB), XMP 1 MiB; the whole record at most 4 MiB. A source field
    over its limit is never truncated (that would corrupt it). ``"keep"`` (default) refuses
    the image with an ImageError that names the field and the way out; ``"drop-oversized"``
    codes the image without that field and records the drop in the stream (``dropped``), so
    an archive always says what it did not keep. The source file is never touched, so the
    refused image is not lost: rerun with ``drop-oversized`` to code its pixels.

Restoring (decode)
    Pixels are stored upright (``load_image`` applies the EXIF orientation), so the EXIF
    written into a decoded file must say so: its IFD0 orientation entry (0x0112) is set to 1
    *in place*, in the byte order of the block, and for a 90-degree rotation (orientations
    5-8) the Exif IFD's PixelXDimension / PixelYDimension are swapped when they described the
    unrotated image. Nothing else changes: the written EXIF is the stored one with those
    values patched (no re-serialization, so maker notes and offsets survive). An XMP
    ``tiff:Orientation`` value is patched to 1 the same way (same length, nothing moves). An
    ICC profile is written only when its colour space matches the decoded pixels (``RGB``
    profile for RGB output, ``GRAY`` for gray), so a CMYK profile of a source that was
    converted to RGB is kept in the archive but not attached to RGB pixels. Which container
    takes which field is in ``WRITABLE``; a field the output cannot carry, or that does not
    fit its container (EXIF over 64 KiB into JPEG), is skipped and reported, never an error.

Colour
    sgarc codes the stored pixel values as they are: no conversion to sRGB. The profile comes
    back on decode, so a colour-managed viewer shows the same colours. The codec was trained
    on sRGB photos, so wide-gamut values (Adobe RGB, Display P3) are coded as if they were
    sRGB: rate and distortion may differ slightly from an sRGB photo, but colours do not shift.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from codec.errors import BitstreamError, ImageError

__all__ = [
    "CONTENT_FIELDS",
    "FIELD_LIMITS",
    "MAX_META_BYTES",
    "METADATA_POLICIES",
    "META_VERSION",
    "WRITABLE",
    "Metadata",
    "RestoreReport",
    "check_file_name",
    "describe",
    "exif_for_output",
    "extract",
    "icc_color_space",
    "oversized_message",
    "save_params",
    "unpack",
    "xmp_for_output",
]

META_VERSION = 1
MAX_META_BYTES = 4 << 20  # the whole META payload

# Field tags, in the order they must appear (strictly increasing: no duplicates, one layout).
_TAGS: dict[str, int] = {
    "format": 1,  # ASCII, Pillow's format name
    "name": 2,  # UTF-8 file name, no directory
    "sha256": 3,  # of the original file bytes
    "exif": 4,  # TIFF structure, as in the source
    "icc": 5,  # ICC profile, as in the source
    "xmp": 6,  # XMP packet, as in the source
    "dropped": 7,  # tags of source fields over their limit, not kept (drop-oversized)
}
_NAMES = {tag: name for name, tag in _TAGS.items()}
FIELD_LIMITS: dict[str, int] = {
    "format": 16,
    "name": 1024,
    "sha256": 32,
    "exif": 1 << 20,
    "icc": 2 << 20,
    "xmp": 1 << 20,
    "dropped": 3,
}
CONTENT_FIELDS = ("exif", "icc", "xmp")
METADATA_POLICIES = ("keep", "drop-oversized")
_LABELS = {"exif": "EXIF block", "icc": "ICC profile", "xmp": "XMP packet"}

_RECORD = struct.Struct(">BI")  # tag u8, length u32
_FORMAT = re.compile(rb"[A-Z0-9]{1,16}")
_EXIF_ID = b"Exif\x00\x00"  # JPEG APP1 identifier code; not part of the EXIF data

# What each output format can take back (Pillow's save parameters for them).
WRITABLE: dict[str, tuple[str, ...]] = {
    "JPEG": ("exif", "icc", "xmp"),
    "PNG": ("exif", "icc", "xmp"),
    "WEBP": ("exif", "icc", "xmp"),
    "TIFF": ("icc",),
}
_JPEG_SEGMENT = 65533  # payload bytes of one JPEG marker segment
_JPEG_MAX_EXIF = _JPEG_SEGMENT - len(_EXIF_ID)
_JPEG_MAX_XMP = _JPEG_SEGMENT - len(b"http://ns.adobe.com/xap/1.0/\x00")


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Metadata:
    """What a source carried besides its pixels (None: the source had no such field)."""

    source_format: str | None = None
    file_name: str | None = None
    sha256: bytes | None = None
    exif: bytes | None = None
    icc: bytes | None = None
    xmp: bytes | None = None
    dropped: tuple[str, ...] = ()  # content fields the source had but that were not kept

    def fields(self) -> dict[str, bytes]:
        """Present fields as their stored bytes, in tag order."""
        values: dict[str, Any] = {
            "format": None if self.source_format is None else self.source_format.encode("ascii"),
            "name": None if self.file_name is None else self.file_name.encode("utf-8"),
            "sha256": self.sha256,
            "exif": self.exif,
            "icc": self.icc,
            "xmp": self.xmp,
            "dropped": bytes(sorted(_TAGS.get(f, 0) for f in self.dropped)) or None,
        }
        return {k: bytes(v) for k, v in values.items() if v is not None}

    def pack(self) -> bytes:
        """The META payload; raises ValueError when a field breaks the format's rules."""
        values = self.fields()
        parts = [bytes([META_VERSION])]
        for name, value in values.items():
            problem = _check(name, value)
            if problem:
                raise ValueError(f"invalid metadata: {problem}")
            parts += [_RECORD.pack(_TAGS[name], len(value)), value]
        problem = _check_record(values)
        if problem:
            raise ValueError(f"invalid metadata: {problem}")
        payload = b"".join(parts)
        if len(payload) > MAX_META_BYTES:
            raise ValueError(f"invalid metadata: {len(payload)} bytes, above the limit of "
                             f"{MAX_META_BYTES}")
        return payload

    def packed_size(self) -> int:
        """Length of the META payload, without building or validating it."""
        return 1 + sum(_RECORD.size + len(v) for v in self.fields().values())

    @property
    def kept(self) -> tuple[str, ...]:
        """Content fields present (exif, icc, xmp), in that order."""
        return tuple(f for f in CONTENT_FIELDS if getattr(self, f) is not None)


def unpack(payload: bytes) -> Metadata:
    """Validate and read a META payload; anything malformed raises BitstreamError."""
    payload = bytes(payload)
    n = len(payload)

    def bad(message: str) -> BitstreamError:
        return BitstreamError(f"corrupt metadata section: {message}")

    if n > MAX_META_BYTES:
        raise bad(f"{n} bytes, above the limit of {MAX_META_BYTES}")
    if n == 0:
        raise bad("empty")
    if payload[0] != META_VERSION:
        raise bad(f"unsupported metadata record version {payload[0]} (this sgarc reads "
                  f"{META_VERSION})")
    pos, last = 1, 0
    values: dict[str, bytes] = {}
    while pos < n:
        if pos + _RECORD.size > n:
            raise bad("truncated field header")
        tag, length = _RECORD.unpack_from(payload, pos)
        pos += _RECORD.size
        name = _NAMES.get(tag)
        if name is None:
            raise bad(f"unknown field tag {tag}")
        if tag <= last:
            raise bad(f"field {name} repeated or out of order")
        if length > n - pos:
            raise bad(f"field {name} claims {length} bytes, only {n - pos} remain")
        value = payload[pos:pos + length]
        pos += length
        problem = _check(name, value)
        if problem:
            raise bad(problem)
        values[name] = value
        last = tag
    problem = _check_record(values)
    if problem:
        raise bad(problem)
    return Metadata(
        source_format=values["format"].decode("ascii") if "format" in values else None,
        file_name=values["name"].decode("utf-8") if "name" in values else None,
        sha256=values.get("sha256"),
        exif=values.get("exif"),
        icc=values.get("icc"),
        xmp=values.get("xmp"),
        dropped=tuple(_NAMES[t] for t in values.get("dropped", b"")),
    )


def _check(name: str, value: bytes) -> str | None:
    """What is wrong with one field's bytes, or None."""
    limit = FIELD_LIMITS[name]
    if not value:
        return f"field {name} is empty (an absent field is left out)"
    if len(value) > limit:
        return f"field {name} is {len(value)} bytes, above its limit of {limit}"
    if name == "sha256" and len(value) != 32:
        return f"field sha256 is {len(value)} bytes, expected 32"
    if name == "format" and not _FORMAT.fullmatch(value):
        return f"field format {value!r} is not 1-16 of A-Z, 0-9"
    if name == "name":
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return "field name is not UTF-8"
        if "\x00" in text or "/" in text:
            return "field name contains NUL or '/'"
    if name == "dropped":
        tags = list(value)
        if any(_NAMES.get(t) not in CONTENT_FIELDS for t in tags) or tags != sorted(set(tags)):
            return f"field dropped {value!r} is not increasing tags of exif, icc, xmp"
    return None


def _check_record(values: dict[str, bytes]) -> str | None:
    if not values:
        return "no fields (a stream without metadata has no META section)"
    for t in values.get("dropped", b""):
        if _NAMES[t] in values:
            return f"field {_NAMES[t]} is both present and listed as dropped"
    return None


# --------------------------------------------------------------------------- extraction


def check_file_name(name: str) -> bytes:
    """The stored form of a file name; ImageError if it cannot be stored."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, not {type(name).__name__}")
    # Undecodable bytes of a POSIX name (surrogate escapes) become U+FFFD.
    try:
        raw = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode()
    except UnicodeEncodeError:  # other lone surrogates
        raw = name.encode("utf-8", "replace")
    problem = _check("name", raw)
    if problem:
        raise ImageError(f"cannot record the file name {name!r}: {problem}")
    return raw


def extract(im: Any, *, sha256: bytes | None, name: str | None, policy: str = "keep",
            dropped: tuple[str, ...] = (), display: str = "<bytes>") -> Metadata:
    """The metadata of a loaded Pillow image, following the policy for oversized fields.

    ``dropped``: fields already removed before Pillow saw them (PNG chunks Pillow cannot
    inflate). ``display`` names the source in messages.
    """
    if policy not in METADATA_POLICIES:
        raise ValueError(f"metadata must be one of {METADATA_POLICIES}, not {policy!r}")
    info = getattr(im, "info", None) or {}
    exif = _as_bytes(info.get("exif"))
    if exif is not None and exif.startswith(_EXIF_ID):
        exif = exif[len(_EXIF_ID):]
    content: dict[str, bytes | None] = {
        "exif": exif or None,
        "icc": _as_bytes(info.get("icc_profile")) or None,
        "xmp": _as_bytes(info.get("xmp")) or None,
    }
    fmt = getattr(im, "format", None)
    fmt = fmt if isinstance(fmt, str) and _FORMAT.fullmatch(fmt.encode("ascii", "replace")) \
        else None
    lost = set(dropped)
    for f in CONTENT_FIELDS:
        value = content[f]
        if value is not None and len(value) > FIELD_LIMITS[f]:
            if policy == "keep":
                raise ImageError(oversized_message(display, f, len(value)))
            content[f] = None
            lost.add(f)
    meta = Metadata(source_format=fmt,
                    file_name=None if name is None else check_file_name(name).decode("utf-8"),
                    sha256=sha256, dropped=tuple(f for f in CONTENT_FIELDS if f in lost),
                    **content)
    # Every field within its limit can still make the whole record too big (all three near
    # their limits); the same policy applies, dropping the largest first.
    while meta.packed_size() > MAX_META_BYTES:
        largest = max(meta.kept, key=lambda f: len(getattr(meta, f)))
        if policy == "keep":
            raise ImageError(
                f"cannot keep the metadata of {display}: together it is more than "
                f"{MAX_META_BYTES:,} bytes (its {_LABELS[largest]} is the largest); pass "
                "metadata='drop-oversized' (--metadata drop-oversized) to code the image "
                "without the largest fields")
        lost.add(largest)
        meta = replace(meta, **{largest: None},
                       dropped=tuple(f for f in CONTENT_FIELDS if f in lost))
    return meta


def oversized_message(display: str, field_name: str, size: int | None) -> str:
    size_text = "more than" if size is None else f"{size:,} bytes, above"
    return (f"cannot keep the metadata of {display}: its {_LABELS[field_name]} is "
            f"{size_text} sgarc's limit of {FIELD_LIMITS[field_name]:,} bytes; pass "
            "metadata='drop-oversized' (--metadata drop-oversized) to code the image without it")


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # older Pillow versions hand XMP over as text
        return value.encode("utf-8")
    return None


# --------------------------------------------------------------------------- restoring


@dataclass
class RestoreReport:
    """What went back into a decoded file, and what did not, and why."""

    restored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (field, reason)
    stripped: bool = False

    def summary(self) -> str:
        if self.stripped:
            return "metadata: stripped"
        if not self.restored and not self.skipped:
            return "metadata: none"
        parts = []
        if self.restored:
            parts.append(f"{', '.join(self.restored)} restored")
        reasons: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            reasons.setdefault(reason, []).append(name)
        parts += [f"{', '.join(names)} {reason}, skipped" for reason, names in reasons.items()]
        return "metadata: " + "; ".join(parts)


def save_params(meta: Metadata | None, fmt: str, mode: str, orientation: int = 1
                ) -> tuple[dict[str, Any], RestoreReport]:
    """Pillow save parameters that put ``meta`` back into a ``fmt`` file of ``mode`` pixels.

    ``orientation`` is the source's EXIF orientation that was applied to the pixels (the
    header's), used to make the written EXIF describe the upright pixels.
    """
    report = RestoreReport()
    params: dict[str, Any] = {}
    if meta is None:
        return params, report
    fmt = fmt.upper()
    writable = WRITABLE.get(fmt, ())
    for name in meta.kept:
        value = getattr(meta, name)
        if name not in writable:
            report.skipped.append((name, f"not supported by {fmt}"))
            continue
        try:
            params.update(_PREPARE[name](value, fmt, mode, orientation))
        except _CannotWriteError as skip:
            report.skipped.append((name, str(skip)))
            continue
        report.restored.append(name)
    return params, report


class _CannotWriteError(Exception):
    """A field that cannot go into this output; the message says why."""


def _exif_param(exif: bytes, fmt: str, mode: str, orientation: int) -> dict[str, Any]:
    try:
        out = exif_for_output(exif, orientation)
    except ValueError as exc:
        raise _CannotWriteError(f"malformed ({exc})") from None
    if fmt == "JPEG":
        if len(out) > _JPEG_MAX_EXIF:
            raise _CannotWriteError(f"is {len(out):,} bytes, more than a JPEG APP1 segment holds "
                        f"({_JPEG_MAX_EXIF:,})")
        out = _EXIF_ID + out  # Pillow writes the JPEG APP1 payload as given
    return {"exif": out}


def _icc_param(icc: bytes, fmt: str, mode: str, orientation: int) -> dict[str, Any]:
    space = icc_color_space(icc)
    if space is None:
        raise _CannotWriteError("malformed (no ICC header)")
    wanted = "GRAY" if mode in ("L", "LA") else "RGB"
    if space != wanted:
        raise _CannotWriteError(f"is for {space} pixels, the decoded image is {mode}")
    return {"icc_profile": icc}


def _xmp_param(xmp: bytes, fmt: str, mode: str, orientation: int) -> dict[str, Any]:
    out = xmp_for_output(xmp)
    if fmt == "JPEG" and len(out) > _JPEG_MAX_XMP:
        raise _CannotWriteError(f"is {len(out):,} bytes, more than a JPEG APP1 segment holds "
                    f"({_JPEG_MAX_XMP:,}; extended XMP is not written)")
    if fmt == "PNG":
        from PIL import PngImagePlugin

        try:
            text = out.decode("utf-8")
        except UnicodeDecodeError:
            raise _CannotWriteError("is not UTF-8, which a PNG iTXt chunk requires") from None
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", text, zip=False)
        return {"pnginfo": info}
    return {"xmp": out}


_PREPARE = {"exif": _exif_param, "icc": _icc_param, "xmp": _xmp_param}


def icc_color_space(icc: bytes) -> str | None:
    """The data colour space of an ICC profile ("RGB", "GRAY", "CMYK", ...), None if no ICC."""
    if len(icc) < 128 or icc[36:40] != b"acsp":
        return None
    return icc[16:20].decode("latin-1").strip()


_ORIENTATION, _EXIF_IFD, _PIXEL_X, _PIXEL_Y = 0x0112, 0x8769, 0xA002, 0xA003


def exif_for_output(exif: bytes, orientation: int = 1) -> bytes:
    """The stored EXIF with its orientation set to 1, patched in place (nothing moves).

    For an applied 90-degree rotation (``orientation`` 5..8), PixelXDimension and
    PixelYDimension are swapped too when both are readable (best effort: a broken Exif IFD
    leaves them alone). Raises ValueError when IFD0 cannot be read or its orientation entry
    cannot be set.
    """
    buf = bytearray(exif)
    if len(buf) < 8 or bytes(buf[:2]) not in (b"II", b"MM"):
        raise ValueError("no TIFF header")
    endian = "<" if buf[:2] == b"II" else ">"
    magic, ifd0 = struct.unpack_from(endian + "HI", buf, 2)
    if magic != 42:
        raise ValueError("no TIFF header")
    entries = _ifd(buf, endian, ifd0)
    if _ORIENTATION in entries:
        _set_int(buf, endian, entries[_ORIENTATION], 1)
    if orientation in (5, 6, 7, 8) and _EXIF_IFD in entries:
        try:
            sub = _ifd(buf, endian, _get_int(buf, endian, entries[_EXIF_IFD]))
            px, py = sub[_PIXEL_X], sub[_PIXEL_Y]
            x, y = _get_int(buf, endian, px), _get_int(buf, endian, py)
            _set_int(buf, endian, px, y)
            _set_int(buf, endian, py, x)
        except (ValueError, KeyError):
            pass
    return bytes(buf)


def _ifd(buf: bytearray, endian: str, offset: int) -> dict[int, tuple[int, int, int]]:
    """{tag: (type, count, position of its 4-byte value field)} of the IFD at ``offset``."""
    if offset < 8 or offset + 2 > len(buf):
        raise ValueError(f"IFD offset {offset} outside the block")
    (count,) = struct.unpack_from(endian + "H", buf, offset)
    if offset + 2 + 12 * count > len(buf):
        raise ValueError(f"IFD at {offset} claims {count} entries, past the end")
    entries = {}
    for i in range(count):
        pos = offset + 2 + 12 * i
        tag, kind, n = struct.unpack_from(endian + "HHI", buf, pos)
        entries.setdefault(tag, (kind, n, pos + 8))
    return entries


_INT_FORMATS = {1: "B", 6: "b", 7: "B", 3: "H", 8: "h", 4: "I", 9: "i", 13: "I"}  # 13: IFD


def _int_position(buf: bytearray, endian: str, entry: tuple[int, int, int]) -> tuple[str, int]:
    """Format and position of an integer entry's first value (inline or at its offset)."""
    kind, n, field_pos = entry
    if kind not in _INT_FORMATS or n < 1:
        raise ValueError(f"entry of type {kind} and count {n} is not an integer")
    fmt = endian + _INT_FORMATS[kind]
    size = struct.calcsize(fmt) * n
    if size <= 4:
        return fmt, field_pos
    (pos,) = struct.unpack_from(endian + "I", buf, field_pos)
    if pos + size > len(buf):
        raise ValueError("entry points past the end of the block")
    return fmt, pos


def _get_int(buf: bytearray, endian: str, entry: tuple[int, int, int]) -> int:
    fmt, pos = _int_position(buf, endian, entry)
    return struct.unpack_from(fmt, buf, pos)[0]


def _set_int(buf: bytearray, endian: str, entry: tuple[int, int, int], value: int) -> None:
    fmt, pos = _int_position(buf, endian, entry)
    struct.pack_into(fmt, buf, pos, value)


_XMP_ORIENTATION = (
    re.compile(rb"(tiff:Orientation\s*=\s*[\"'])[1-8]([\"'])"),
    re.compile(rb"(<tiff:Orientation>\s*)[1-8](\s*</tiff:Orientation>)"),
)


def xmp_for_output(xmp: bytes) -> bytes:
    """The stored XMP with any tiff:Orientation set to 1 (one digit replaced, nothing moves)."""
    for pattern in _XMP_ORIENTATION:
        xmp = pattern.sub(rb"\g<1>1\g<2>", xmp)
    return xmp


# --------------------------------------------------------------------------- display


def describe(meta: Metadata) -> list[tuple[str, str]]:
    """(label, text) lines for ``sgarc info``; text is safe to print to a terminal."""
    lines = []
    source = [meta.source_format or "unknown format"]
    if meta.file_name is not None:
        source.append(_printable(meta.file_name, 200))
    lines.append(("source", ", ".join(source)))
    if meta.sha256 is not None:
        lines.append(("sha256", meta.sha256.hex()))
    if meta.exif is not None:
        lines.append(("exif", f"{len(meta.exif)} bytes: {_exif_summary(meta.exif)}"))
    if meta.icc is not None:
        lines.append(("icc", f"{len(meta.icc)} bytes: {_icc_summary(meta.icc)}"))
    if meta.xmp is not None:
        lines.append(("xmp", f"{len(meta.xmp)} bytes"))
    if meta.dropped:
        lines.append(("dropped", f"{', '.join(meta.dropped)} (over the limit at encode)"))
    return lines


def _printable(text: Any, limit: int = 64) -> str:
    text = str(text).rstrip("\x00").strip()
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _exif_summary(exif: bytes) -> str:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = Image.Exif()
            e.load(_EXIF_ID + exif)
            sub, gps = e.get_ifd(_EXIF_IFD), e.get_ifd(0x8825)
            parts = []
            camera = " ".join(_printable(e[t]) for t in (0x010F, 0x0110) if e.get(t))
            if camera:
                parts.append(camera)
            taken = sub.get(0x9003)  # DateTimeOriginal
            if taken:
                parts.append(f"taken {_printable(taken)}")
            parts.append(f"GPS {_gps_text(gps)}" if gps else "no GPS")
            parts.append(f"orientation {_printable(e.get(_ORIENTATION, 'absent'))}")
    except Exception as exc:  # malformed EXIF is stored as is; say so, do not fail
        return f"unreadable ({type(exc).__name__})"
    return ", ".join(parts)


def _gps_text(gps: dict) -> str:
    try:
        lat = sum(float(v) / 60**i for i, v in enumerate(gps[2]))
        lon = sum(float(v) / 60**i for i, v in enumerate(gps[4]))
        return f"{lat:.5f} {_printable(gps.get(1, ''))}, {lon:.5f} {_printable(gps.get(3, ''))}"
    except Exception:
        return "present"


def _icc_summary(icc: bytes) -> str:
    space = icc_color_space(icc)
    if space is None:
        return "malformed (no ICC header)"
    try:
        from PIL import ImageCms

        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
        return f'"{_printable(desc)}" ({space})' if desc.strip() else f"({space})"
    except Exception:
        return f"({space}; description unreadable)"
