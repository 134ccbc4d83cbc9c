"""The sgarc bitstream: an archive format (layout documented in docs/bitstream.md).

    magic "SGAC" | version u8 | width u32 | height u32 | color u8 | orientation u8 |
    bit_depth u8 | pad_mode u8 | model_id_len u8 | model_id | [rate u16, version 2] |
    [route u8, version 3] | { tag 4s | length u32 | payload }*  |  crc32 u32 (of all before)

Version 1 streams come from fixed-rate models; version 2 adds the rate point of a
variable-rate model (its grid index, codec.variable_rate). Version 4 (experimental) comes
from a bits-back model (codec.bits_back): it adds the decoder's BBVI step count and a
digest of the entropy model that carries the side information. Version 3 holds the source file
itself instead of latents (codec.routes): a route byte (1 jpeg-lossless: a bit-exact JPEG XL
transcode in JXLJ; 2 original: the file as it was in ORIG) and no model (an empty id). All
are read; a writer uses the lowest version that holds its header, so learned streams are
byte-for-byte what they were (version 1 or 2, implicitly route 0, learned).

All integers are big-endian. `parse` checks, in order: length, magic, version, checksum,
header fields, then every section length against the bytes that remain, and raises
BitstreamError with a message that names the problem. Nothing is allocated from a length
that has not been checked against the data actually present or a validated header field.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

from codec.errors import BitstreamError

MAGIC = b"SGAC"
FORMAT_VERSION = 4  # the newest version written and read
VERSIONS = (1, 2, 3, 4)
MAX_RATE = 0xFFFF
FORMAT_MAX_PIXELS = 1 << 28  # no valid stream describes a larger (padded) image
PAD_MULTIPLE = 64  # z's stride: z covers the image padded to this multiple
Y_BLOCK = 16  # y's stride: one y position per 16x16 block of pixels
MAX_MODEL_ID = 64
COLORS = ("RGB", "L")
# Which y positions a learned stream codes (the header's pad_mode byte). y is on the grid
# of z's (4 y per z per axis, covering the image padded to a multiple of 64). "replicate"
# (code 0) codes all of it. "tight" (1) and "tight+1" (2) code only the 16-pixel blocks that
# hold image pixels plus a margin of 0 or 1 positions (`latent_grids`, top left); the rest
# has k = 0, i.e. y_hat = mu there, for free. Coding all of it spent up to 27% more y
# positions than the pixels need (bsds500's 481x321; 8-11% of the bits); the encoder picks
# the margin per image by its RD loss (docs/bitstream.md).
PAD_MODES = ("replicate", "tight", "tight+1")
TIGHT_MARGINS = {"tight": 0, "tight+1": 1}  # what encoders write (codec.inference)
ROUTES = ("learned", "jpeg-lossless", "original")  # route codes 0, 1, 2 (codec.routes)
# learned: z stream, y stream, optional lossless alpha; jpeg-lossless: the JPEG XL transcode
# of the source JPEG; original: the source file. Then optional metadata (codec.metadata).
ROUTE_SECTIONS = {"learned": ("ZLAT", "YLAT", "ALPH", "META"),
                  "jpeg-lossless": ("JXLJ", "META"), "original": ("ORIG", "META")}
ROUTE_REQUIRED = {"learned": ("ZLAT", "YLAT"), "jpeg-lossless": ("JXLJ",),
                  "original": ("ORIG",)}
SECTION_ORDER = ("ZLAT", "YLAT", "ALPH", "JXLJ", "ORIG", "META")  # every tag, in order
REQUIRED_SECTIONS = ROUTE_REQUIRED["learned"]

_PREFIX = struct.Struct(">4sB")
_FIELDS = struct.Struct(">IIBBBBB")
_SECTION = struct.Struct(">4sI")
_CRC = struct.Struct(">I")
_RATE = struct.Struct(">H")
_BITS_BACK = struct.Struct(">II")  # version 4: BBVI steps, digest of Q(z_hat | ...)
MIN_LENGTH = _PREFIX.size + _FIELDS.size + 1 + _CRC.size
_MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")


@dataclass(frozen=True)
class Header:
    model_id: str
    width: int
    height: int
    color: str = "RGB"  # what decode returns: "RGB" or "L" (grayscale source)
    orientation: int = 1  # EXIF orientation of the source, already applied to the pixels
    bit_depth: int = 8  # sample depth of the source (16 when reduced on request)
    pad_mode: str = "replicate"
    rate: int | None = None  # rate point of a variable-rate model (grid index); None: fixed
    route: str = "learned"  # or "jpeg-lossless" / "original": the source file, no model
    # version 4, a bits-back model's stream (codec.bits_back): the BBVI steps that
    # reproduce Q(z_hat | mu_z, sigma_z) from y_hat, and a digest of that Q; else None
    bbvi_steps: int | None = None
    q_digest: int = 0

    @property
    def version(self) -> int:
        if self.route != "learned":
            return 3
        if self.bbvi_steps is not None:
            return 4
        return 1 if self.rate is None else 2

    @property
    def padded_pixels(self) -> int:
        """The decoder's work and memory scale with this, not with width * height."""
        return (-(-self.width // PAD_MULTIPLE) * PAD_MULTIPLE
                * -(-self.height // PAD_MULTIPLE) * PAD_MULTIPLE)

    def validate(self, max_pixels: int = FORMAT_MAX_PIXELS) -> None:
        if self.route not in ROUTES:
            raise BitstreamError(f"unknown route {self.route!r}")
        if self.route != "learned":  # the source file itself: no model, no rate point
            if self.model_id != "" or self.rate is not None:
                raise BitstreamError(f"a {self.route} stream has no model id or rate point")
        elif not (isinstance(self.model_id, str) and 0 < len(self.model_id) <= MAX_MODEL_ID
                  and _MODEL_ID.fullmatch(self.model_id)):
            raise BitstreamError(f"invalid model id {self.model_id!r}")
        if self.width < 1 or self.height < 1:
            raise BitstreamError(f"invalid image size {self.width}x{self.height}")
        limit = min(max_pixels, FORMAT_MAX_PIXELS)
        # The decoder works on the padded area: bound it too, so that an elongated image
        # (1 x N pads to 64 x N) cannot multiply the work. 2 * limit + 64^2 never refuses
        # an image of ordinary proportions that is within the limit.
        if (self.width * self.height > limit
                or self.padded_pixels > 2 * limit + PAD_MULTIPLE**2):
            raise BitstreamError(
                f"image size {self.width}x{self.height} ({self.padded_pixels} pixels once "
                f"padded to a multiple of {PAD_MULTIPLE}) exceeds the limit of {limit} pixels")
        if self.color not in COLORS:
            raise BitstreamError(f"unknown color mode {self.color!r}")
        if not 1 <= self.orientation <= 8:
            raise BitstreamError(f"invalid orientation {self.orientation} (EXIF uses 1..8)")
        if self.bit_depth not in (8, 16):
            raise BitstreamError(f"invalid source bit depth {self.bit_depth}")
        if self.pad_mode not in PAD_MODES:
            raise BitstreamError(f"unknown padding mode {self.pad_mode!r}")
        if self.rate is not None and not 0 <= self.rate <= MAX_RATE:
            raise BitstreamError(f"invalid rate point {self.rate}")
        if self.bbvi_steps is not None and (
                self.rate is not None or self.route != "learned"
                or not 0 <= self.bbvi_steps < 1 << 32 or not 0 <= self.q_digest < 1 << 32):
            raise BitstreamError("invalid bits-back fields")


def latent_grids(width: int, height: int, pad_mode: str
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, columns) of z, and of the y positions a stream codes, for an image of this
    size under `pad_mode` (the rest of y's grid, 4x z's, has k = 0)."""
    z = (-(-height // PAD_MULTIPLE), -(-width // PAD_MULTIPLE))
    step = PAD_MULTIPLE // Y_BLOCK
    full = (z[0] * step, z[1] * step)
    if pad_mode not in TIGHT_MARGINS:
        return z, full
    margin = TIGHT_MARGINS[pad_mode]
    return z, (min(-(-height // Y_BLOCK) + margin, full[0]),
               min(-(-width // Y_BLOCK) + margin, full[1]))


@dataclass
class Bitstream:
    header: Header
    sections: dict[str, bytes] = field(default_factory=dict)


def pack(bs: Bitstream) -> bytes:
    h = bs.header
    h.validate()
    ident = h.model_id.encode("ascii")
    parts = [
        _PREFIX.pack(MAGIC, h.version),
        _FIELDS.pack(h.width, h.height, COLORS.index(h.color), h.orientation, h.bit_depth,
                     PAD_MODES.index(h.pad_mode), len(ident)),
        ident,
    ]
    if h.rate is not None:
        parts.append(_RATE.pack(h.rate))
    if h.version == 4:
        parts.append(_BITS_BACK.pack(h.bbvi_steps, h.q_digest))
    if h.version == 3:
        parts.append(bytes([ROUTES.index(h.route)]))
    order = ROUTE_SECTIONS[h.route]
    for tag in order:
        if tag in bs.sections:
            payload = bs.sections[tag]
            parts += [_SECTION.pack(tag.encode("ascii"), len(payload)), payload]
    unknown = set(bs.sections) - set(order)
    if unknown:
        raise ValueError(f"sections {sorted(unknown)} do not belong in a {h.route} stream")
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def parse(data: bytes, max_pixels: int = FORMAT_MAX_PIXELS) -> Bitstream:
    """Validate and split a stream; raises BitstreamError saying what is wrong."""
    data = bytes(data)
    if len(data) < MIN_LENGTH:
        raise BitstreamError(f"truncated: {len(data)} bytes, an sgarc stream has at least "
                             f"{MIN_LENGTH}")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f"not an sgarc bitstream (starts with {magic!r}, expected {MAGIC!r})")
    if version not in VERSIONS:
        raise BitstreamError(f"unsupported format version {version}: this sgarc reads versions "
                             f"{', '.join(map(str, VERSIONS))}; use the sgarc release that "
                             "wrote the file")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        raise BitstreamError("checksum mismatch: the stream is corrupt or truncated")
    pos = _PREFIX.size  # MIN_LENGTH guarantees the fixed fields are present
    w, h, color, orientation, depth, pad, id_len = _FIELDS.unpack_from(body, pos)
    pos += _FIELDS.size
    # an empty id only in version 3 (no model), where the route byte must then say so
    if ((id_len == 0 and version < 3) or id_len > MAX_MODEL_ID
            or pos + id_len > len(body)):
        raise BitstreamError(f"invalid model id length {id_len}")
    try:
        model_id = body[pos:pos + id_len].decode("ascii")
    except UnicodeDecodeError as exc:
        raise BitstreamError("model id is not ASCII") from exc
    pos += id_len
    rate, route, bbvi_steps, q_digest = None, "learned", None, 0
    if version == 4:
        if pos + _BITS_BACK.size > len(body):
            raise BitstreamError("truncated header: no bits-back fields")
        bbvi_steps, q_digest = _BITS_BACK.unpack_from(body, pos)
        pos += _BITS_BACK.size
    elif version == 2:
        if pos + _RATE.size > len(body):
            raise BitstreamError("truncated header: no rate point")
        (rate,) = _RATE.unpack_from(body, pos)
        pos += _RATE.size
    elif version == 3:
        if pos >= len(body):
            raise BitstreamError("truncated header: no route")
        code = body[pos]
        pos += 1
        if code >= len(ROUTES):
            raise BitstreamError(f"unknown route code {code}")
        if code == 0:  # one encoding per stream: version 1 and 2 hold learned streams
            raise BitstreamError("route 0 (learned) is written as version 1 or 2, not 3")
        route = ROUTES[code]
    if color >= len(COLORS):
        raise BitstreamError(f"unknown color mode code {color}")
    if pad >= len(PAD_MODES):
        raise BitstreamError(f"unknown padding mode code {pad}")
    header = Header(model_id, w, h, COLORS[color], orientation, depth, PAD_MODES[pad], rate,
                    route, bbvi_steps, q_digest)
    header.validate(max_pixels)
    order = ROUTE_SECTIONS[route]
    sections: dict[str, bytes] = {}
    while pos < len(body):
        if pos + _SECTION.size > len(body):
            raise BitstreamError("truncated section header")
        raw_tag, length = _SECTION.unpack_from(body, pos)
        pos += _SECTION.size
        tag = raw_tag.decode("ascii", errors="replace")
        if tag not in SECTION_ORDER:
            raise BitstreamError(f"unknown section {raw_tag!r}")
        if tag not in order:
            raise BitstreamError(f"section {tag} does not belong in a {route} stream")
        if tag in sections or any(order.index(t) > order.index(tag) for t in sections):
            raise BitstreamError(f"section {tag} repeated or out of order")
        if length > len(body) - pos:
            raise BitstreamError(f"section {tag} claims {length} bytes, only "
                                 f"{len(body) - pos} remain")
        sections[tag] = body[pos:pos + length]
        pos += length
    missing = [t for t in ROUTE_REQUIRED[route] if t not in sections]
    if missing:
        raise BitstreamError(f"missing section(s) {', '.join(missing)}")
    return Bitstream(header, sections)


def pack_alpha(alpha: bytes) -> bytes:
    return zlib.compress(alpha, 9)


def unpack_alpha(payload: bytes, width: int, height: int) -> bytes:
    """Inflate the alpha plane, never beyond width*height bytes."""
    expected = width * height
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, expected + 1)
    except zlib.error as exc:
        raise BitstreamError(f"corrupt alpha section: {exc}") from exc
    if len(out) != expected or not d.eof or d.unconsumed_tail or d.unused_data:
        raise BitstreamError(f"corrupt alpha section: expected {expected} bytes of alpha")
    return out
