"""Bit-exact JPEG transcoding with JPEG XL (libjxl, through imagecodecs).

libjxl's lossless JPEG transcoding keeps a JPEG's DCT coefficients, codes them better than
JPEG's Huffman tables do (about 20% smaller on photos) and keeps a reconstruction record
(the `jbrd` box), so the original file comes back byte for byte: markers, EXIF, ICC and
all. This is the `jpeg-lossless` route of codec.routes.

Two guards keep it an archive format: :func:`transcode` decodes its own result back and
returns it only when the reconstruction equals the source (otherwise None: the route is not
available for that file, e.g. an arithmetic-coded or CMYK JPEG libjxl refuses); and
:func:`reconstruct` reads the image size the JPEG XL codestream declares before libjxl
allocates anything, and refuses a payload whose size disagrees with the stream's header
(which was already checked against the pixel limit).
"""

from __future__ import annotations

import struct

from codec.errors import BitstreamError

# ISO/IEC 18181-2 container: a signature box, then boxes; the codestream is in one `jxlc`
# box or split over `jxlp` boxes (each starting with a 4-byte index).
_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_CODESTREAM = b"\xff\x0a"
# SizeHeader aspect ratios (ISO/IEC 18181-1, D.2): xsize = ysize * num / den
_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
_U32_BITS = (9, 13, 18, 30)  # the SizeHeader's U32 distributions: 1 + u(n)
_HEAD = 16  # bytes of codestream that always hold the signature and the SizeHeader


def transcode(jpeg: bytes) -> bytes | None:
    """The JPEG XL transcode of a JPEG file, or None when libjxl refuses it, it would not
    give back exactly these bytes, or this machine has no libjxl (imagecodecs missing or
    built without it: the route is then simply not offered, e.g. on the GPU image)."""
    try:
        import imagecodecs
    except ImportError:
        return None
    if not imagecodecs.JPEGXL.available:
        return None
    try:
        payload = bytes(imagecodecs.jpegxl_encode_jpeg(jpeg))
        back = bytes(imagecodecs.jpegxl_decode_jpeg(payload))
    except (imagecodecs.JpegxlError, ValueError, RuntimeError, MemoryError):
        return None
    return payload if back == jpeg else None


def reconstruct(payload: bytes, width: int, height: int) -> bytes:
    """The JPEG file a `jpeg-lossless` payload holds; BitstreamError when it is corrupt or
    declares another image size than ``width`` x ``height`` (in either orientation: the
    codestream holds the JPEG as stored, the header the upright image)."""
    import imagecodecs

    xsize, ysize = codestream_size(payload)
    if sorted((xsize, ysize)) != sorted((width, height)):
        raise BitstreamError(f"corrupt JPEG XL payload: it declares a {xsize}x{ysize} image, "
                             f"the header {width}x{height}")
    try:
        return bytes(imagecodecs.jpegxl_decode_jpeg(payload))
    except (imagecodecs.JpegxlError, ValueError, RuntimeError) as exc:
        raise BitstreamError(f"corrupt JPEG XL payload: {exc}") from None


def codestream_size(payload: bytes) -> tuple[int, int]:
    """(xsize, ysize) from the SizeHeader of a JPEG XL file (bare codestream or container),
    read without decoding; BitstreamError when there is none."""
    head = _codestream_head(bytes(payload))
    if not head.startswith(_CODESTREAM):
        raise BitstreamError("corrupt JPEG XL payload: no JPEG XL codestream")
    bits = _Bits(head[len(_CODESTREAM):])
    try:
        small = bits.read(1)
        ysize = bits.dimension(small)
        ratio = bits.read(3)
        if ratio:
            num, den = _RATIOS[ratio]
            xsize = ysize * num // den
        else:
            xsize = bits.dimension(small)
    except EOFError:
        raise BitstreamError("corrupt JPEG XL payload: truncated size header") from None
    return xsize, ysize


def _codestream_head(data: bytes) -> bytes:
    """The first bytes of the codestream: the file itself, or gathered from its boxes."""
    if not data.startswith(_CONTAINER):
        return data[:_HEAD]
    head, pos = b"", 0
    while pos < len(data) and len(head) < _HEAD:
        if pos + 8 > len(data):
            raise BitstreamError("corrupt JPEG XL payload: truncated box header")
        size, kind = struct.unpack_from(">I4s", data, pos)
        start = pos + 8
        if size == 1:  # a 64-bit size follows
            if start + 8 > len(data):
                raise BitstreamError("corrupt JPEG XL payload: truncated box header")
            (size,) = struct.unpack_from(">Q", data, start)
            start += 8
        end = len(data) if size == 0 else pos + size
        if end < start or end > len(data):
            raise BitstreamError(f"corrupt JPEG XL payload: box {kind!r} claims {size} bytes")
        if kind == b"jxlc":
            head += data[start:end]
        elif kind == b"jxlp":
            head += data[start + 4:end]
        pos = end
    return head[:_HEAD]


class _Bits:
    """JPEG XL's bit reader: least significant bit first."""

    def __init__(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "little")
        self.left = 8 * len(data)

    def read(self, n: int) -> int:
        if n > self.left:
            raise EOFError
        out = self.value & ((1 << n) - 1)
        self.value >>= n
        self.left -= n
        return out

    def dimension(self, small: int) -> int:
        """One SizeHeader dimension: 8 * (1 + u(5)) when small, else 1 + U32(9, 13, 18, 30)."""
        if small:
            return (self.read(5) + 1) * 8
        return self.read(_U32_BITS[self.read(2)]) + 1
