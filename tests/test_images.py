"""Tests of codec.images: the input/output policy, on small synthetic images only."""

from __future__ import annotations

import io
import os
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from codec.errors import ImageError, SgarcError
from codec.images import (
    DEFAULT_MAX_PIXELS,
    PreparedImage,
    SourceInfo,
    crop,
    load_image,
    pad_to_multiple,
    padded_batch,
    save_image,
    to_pil,
)

RNG_SEED = 1234


def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def encode(im: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def noise(h: int, w: int, c: int | None = 3) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return rng().integers(0, 256, shape, dtype=np.uint8)


def reduce16(v) -> np.ndarray:
    return ((np.asarray(v, dtype=np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(
    width: int,
    height: int,
    bit_depth: int,
    color_type: int,
    data: bytes,
    extra: bytes = b"",
    interlace: int = 0,
) -> bytes:
    """A PNG built by hand (Pillow cannot write 16-bit RGB); ``data`` is the filtered scanlines."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", zlib.compress(data))
        + png_chunk(b"IEND", b"")
    )


# Adam7 passes: (first row, first column, row step, column step).
ADAM7 = [
    (0, 0, 8, 8),
    (0, 4, 8, 8),
    (4, 0, 8, 4),
    (0, 2, 4, 4),
    (2, 0, 4, 2),
    (0, 1, 2, 2),
    (1, 0, 2, 1),
]


def scanlines(samples: np.ndarray) -> bytes:
    """16-bit scanlines, alternating filter types None (0) and Sub (1) so unfiltering is used."""
    be = samples.astype(">u2")
    bpp = 2 * (samples.shape[2] if samples.ndim == 3 else 1)
    out = b""
    for y in range(be.shape[0]):
        row = np.frombuffer(be[y].tobytes(), np.uint8)
        if y % 2:
            sub = row.copy()
            sub[bpp:] = row[bpp:] - row[:-bpp]  # uint8 wrap-around is the PNG arithmetic
            out += b"\x01" + sub.tobytes()
        else:
            out += b"\x00" + row.tobytes()
    return out


def png16(samples: np.ndarray, color_type: int, extra: bytes = b"", interlace: bool = False):
    """16-bit PNG of (H, W[, C]) samples, optionally Adam7-interlaced."""
    h, w = samples.shape[:2]
    if not interlace:
        return png_bytes(w, h, 16, color_type, scanlines(samples), extra)
    data = b""
    for y0, x0, dy, dx in ADAM7:
        part = samples[y0::dy, x0::dx]
        if part.shape[0] and part.shape[1]:
            data += scanlines(part)
    return png_bytes(w, h, 16, color_type, data, extra, interlace=1)


def tiff16(samples: np.ndarray, big_endian: bool = False) -> bytes:
    """Uncompressed 16-bit RGB / RGBA (unassociated alpha) TIFF built by hand."""
    h, w, c = samples.shape
    e = ">" if big_endian else "<"
    data = samples.astype(e + "u2").tobytes()
    entries = [
        (256, 3, 1, w),
        (257, 3, 1, h),
        (258, 3, c, None),  # BitsPerSample: offset filled in below
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, None),  # StripOffsets
        (277, 3, 1, c),
        (278, 3, 1, h),
        (279, 4, 1, len(data)),
        (284, 3, 1, 1),
    ]
    if c == 4:
        entries.append((338, 3, 1, 2))
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = 8 + ifd_size
    data_offset = bits_offset + 2 * c
    out = (b"MM\x00\x2a" if big_endian else b"II\x2a\x00") + struct.pack(e + "I", 8)
    out += struct.pack(e + "H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 258:
            value = bits_offset
            field = struct.pack(e + "I", value)
        elif tag == 273:
            field = struct.pack(e + "I", data_offset)
        elif typ == 3:
            field = struct.pack(e + "H", value) + b"\x00\x00"
        else:
            field = struct.pack(e + "I", value)
        out += struct.pack(e + "HHI", tag, typ, count) + field
    out += struct.pack(e + "I", 0)
    out += struct.pack(e + "H", 16) * c
    assert len(out) == data_offset
    return out + data


@pytest.fixture
def fake_open(monkeypatch):
    """Make PIL.Image.open return a copy of ``im``: for modes no file format stores."""

    def install(im: Image.Image) -> None:
        def opener(fp, *args, **kwargs):
            return im.copy()

        monkeypatch.setattr(Image, "open", opener)

    return install


# --------------------------------------------------------------------------- modes


def test_rgb_png_is_exact():
    pixels = noise(5, 7)
    prep = load_image(encode(Image.fromarray(pixels)))
    assert isinstance(prep, PreparedImage)
    assert prep.rgb.dtype == np.uint8 and prep.rgb.shape == (5, 7, 3)
    assert prep.rgb.flags.writeable and prep.rgb.flags.c_contiguous
    np.testing.assert_array_equal(prep.rgb, pixels)
    assert prep.alpha is None
    assert prep.info == SourceInfo(
        width=7,
        height=5,
        mode="RGB",
        format="PNG",
        orientation=1,
        color="RGB",
        bit_depth=8,
        has_alpha=False,
    )


def test_path_and_pathlike_sources(tmp_path):
    pixels = noise(3, 4)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    for source in (path, str(path)):
        np.testing.assert_array_equal(load_image(source).rgb, pixels)


def test_gray_l_is_replicated():
    gray = noise(4, 6, None)
    prep = load_image(encode(Image.fromarray(gray)))
    assert prep.info.mode == "L" and prep.info.color == "L"
    for c in range(3):
        np.testing.assert_array_equal(prep.rgb[:, :, c], gray)


def test_bilevel_1_becomes_gray_0_255():
    bits = noise(3, 9, None) > 127
    im = Image.fromarray(bits.astype(np.uint8) * 255).convert("1")
    prep = load_image(encode(im))
    assert prep.info.mode == "1" and prep.info.color == "L"
    np.testing.assert_array_equal(prep.rgb[:, :, 0], np.where(bits, 255, 0))
    np.testing.assert_array_equal(prep.rgb[:, :, 2], np.where(bits, 255, 0))


def test_palette_becomes_rgb():
    rgb = noise(6, 5)
    im = Image.fromarray(rgb).quantize(colors=16)
    prep = load_image(encode(im))
    assert prep.info.mode == "P" and prep.info.color == "RGB" and not prep.info.has_alpha
    np.testing.assert_array_equal(prep.rgb, np.asarray(im.convert("RGB")))


def test_gray_palette_stays_rgb():
    im = Image.fromarray(noise(4, 4, None)).convert("P")
    prep = load_image(encode(im))
    assert prep.info.color == "RGB"


def test_palette_with_transparency_keeps_alpha():
    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(index).convert("P")
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    data = encode(im, transparency=1)
    prep = load_image(data)
    assert prep.info.mode == "P" and prep.info.has_alpha
    np.testing.assert_array_equal(prep.alpha, np.where(index == 1, 0, 255))
    np.testing.assert_array_equal(prep.rgb[0, 0], [10, 20, 30])
    flat = load_image(data, alpha="flatten")
    np.testing.assert_array_equal(flat.rgb[0, 1], [255, 255, 255])
    assert flat.alpha is None and not flat.info.has_alpha


def test_rgb_with_trns_colour_key():
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8)
    prep = load_image(encode(Image.fromarray(rgb), transparency=(4, 5, 6)))
    assert prep.info.has_alpha
    np.testing.assert_array_equal(prep.alpha, [[255, 0]])


def test_rgba_partial_alpha_is_kept_exactly():
    rgba = noise(5, 6, 4)
    prep = load_image(encode(Image.fromarray(rgba)))
    assert prep.info.mode == "RGBA" and prep.info.has_alpha and prep.info.color == "RGB"
    assert prep.rgb.flags.writeable and prep.alpha.flags.writeable
    assert prep.rgb.flags.c_contiguous and prep.alpha.flags.c_contiguous
    np.testing.assert_array_equal(prep.rgb, rgba[:, :, :3])
    np.testing.assert_array_equal(prep.alpha, rgba[:, :, 3])


def test_opaque_rgba_drops_alpha_losslessly():
    rgba = noise(4, 4, 4)
    rgba[:, :, 3] = 255
    for policy in ("keep", "flatten", "error"):
        prep = load_image(encode(Image.fromarray(rgba)), alpha=policy)
        assert prep.alpha is None and not prep.info.has_alpha
        np.testing.assert_array_equal(prep.rgb, rgba[:, :, :3])


def test_flatten_composites_over_white():
    rgba = noise(5, 5, 4)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    prep = load_image(encode(Image.fromarray(rgba)), alpha="flatten")
    assert prep.alpha is None and not prep.info.has_alpha
    c = rgba[:, :, :3].astype(np.int64)
    a = rgba[:, :, 3:].astype(np.int64)
    expected = np.floor((c * a + 255 * (255 - a)) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(prep.rgb, expected)
    np.testing.assert_array_equal(prep.rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(prep.rgb[0, 1], rgba[0, 1, :3])


def test_alpha_error_policy():
    rgba = noise(3, 3, 4)
    rgba[1, 1, 3] = 7
    with pytest.raises(ImageError, match=r"alpha channel; pass alpha='keep' or 'flatten'"):
        load_image(encode(Image.fromarray(rgba)), alpha="error")


def test_la_is_gray_with_alpha():
    la = noise(4, 5, 2)
    prep = load_image(encode(Image.fromarray(la)))
    assert prep.info.mode == "LA" and prep.info.color == "L" and prep.info.has_alpha
    np.testing.assert_array_equal(prep.rgb[:, :, 1], la[:, :, 0])
    np.testing.assert_array_equal(prep.alpha, la[:, :, 1])


@pytest.mark.parametrize("mode", ["PA", "RGBa", "La"])
def test_unstorable_alpha_modes(fake_open, mode):
    if mode == "PA":
        base = Image.fromarray(noise(3, 4, 4)).convert("PA")
    else:
        base = Image.frombytes(mode, (4, 3), noise(3, 4, len(mode)).tobytes())
    assert np.asarray(base)[:, :, -1].min() < 255  # the alpha is really partial
    fake_open(base)
    prep = load_image(b"not used")
    expected = base.convert("LA" if mode == "La" else "RGBA")
    exp = np.asarray(expected)
    assert prep.info.mode == mode
    assert prep.info.color == ("L" if mode == "La" else "RGB")
    np.testing.assert_array_equal(prep.alpha, exp[:, :, -1])
    np.testing.assert_array_equal(prep.rgb[:, :, 0], exp[:, :, 0])


@pytest.mark.parametrize(("mode", "fmt"), [("CMYK", "TIFF"), ("CMYK", "JPEG"), ("LAB", "TIFF")])
def test_converted_modes_from_files(mode, fmt):
    im = Image.frombytes(mode, (6, 4), noise(4, 6, len(mode) if mode == "CMYK" else 3).tobytes())
    data = encode(im, fmt)
    source = Image.open(io.BytesIO(data))
    prep = load_image(data)
    assert prep.info.mode == mode and prep.info.color == "RGB" and prep.info.bit_depth == 8
    np.testing.assert_array_equal(prep.rgb, np.asarray(source.convert("RGB")))


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "RGBX"])
def test_converted_modes_in_memory(fake_open, mode):
    im = Image.frombytes(mode, (5, 3), noise(3, 5, len(mode) if mode != "YCbCr" else 3).tobytes())
    fake_open(im)
    prep = load_image(b"x")
    assert prep.info.mode == mode and prep.info.color == "RGB"
    np.testing.assert_array_equal(prep.rgb, np.asarray(im.convert("RGB")))


def test_cmyk_naive_conversion_values():
    im = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # no cyan, full M and Y: red
    prep = load_image(encode(im, "TIFF"))
    np.testing.assert_array_equal(prep.rgb[0, 0], [255, 0, 0])


def test_unknown_mode_raises(monkeypatch):
    # Every mode Pillow 13 has is handled, so a stand-in opened image carries an unknown one.
    class Opened:
        size, mode, format, tile, info = (2, 2), "BGR;24", "BMP", [], {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: Opened())
    with pytest.raises(ImageError, match=r"unsupported image mode 'BGR;24'"):
        load_image(b"x")


# --------------------------------------------------------------------------- depth


def test_i16_png_depth_policy():
    values = np.array([[0, 1, 128, 255, 256], [32767, 32768, 65279, 65534, 65535]], np.uint16)
    data = encode(Image.fromarray(values))
    with pytest.raises(ImageError, match=r"16-bit samples; sgarc codes 8-bit: pass depth='reduce'"):
        load_image(data)
    prep = load_image(data, depth="reduce")
    assert prep.info.mode == "I;16" and prep.info.color == "L" and prep.info.bit_depth == 16
    np.testing.assert_array_equal(prep.rgb[:, :, 0], reduce16(values))
    np.testing.assert_array_equal(prep.rgb[:, :, 0], [[0, 0, 0, 1, 1], [127, 128, 254, 255, 255]])


def test_i16_gray_trns_key_becomes_alpha():
    values = np.array([[1000, 2000, 1000]], np.uint16)
    data = png16(values, 0, extra=png_chunk(b"tRNS", struct.pack(">H", 1000)))
    prep = load_image(data, depth="reduce")
    np.testing.assert_array_equal(prep.alpha, [[0, 255, 0]])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_i16_family(fake_open, mode):
    values = np.array([[0, 255, 257, 40000, 65535]], np.uint16)
    big = mode == "I;16B" or (mode == "I;16N" and sys.byteorder == "big")
    im = Image.frombytes(mode, (5, 1), values.astype(">u2" if big else "<u2").tobytes())
    fake_open(im)
    with pytest.raises(ImageError, match="16-bit"):
        load_image(b"x")
    prep = load_image(b"x", depth="reduce")
    assert prep.info.mode == mode and prep.info.bit_depth == 16 and prep.info.color == "L"
    np.testing.assert_array_equal(prep.rgb[0, :, 1], reduce16(values[0]))


def test_i32_clips_then_reduces():
    values = np.array([[-1, 0, 257, 65535, 70000]], np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    with pytest.raises(ImageError, match="16-bit"):
        load_image(data)
    prep = load_image(data, depth="reduce")
    assert prep.info.mode == "I" and prep.info.bit_depth == 16
    np.testing.assert_array_equal(prep.rgb[0, :, 0], [0, 0, 1, 255, 255])


def test_float_is_0_255_scale_clipped_rounded():
    values = np.array([[-5, 0.4, 0.5, 127.49, 254.6, 300, np.nan]], np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    # Named for what it is (not "16-bit samples"), with what sgarc takes instead.
    with pytest.raises(ImageError, match="32-bit floating-point image; sgarc takes 8- and "
                                         "16-bit integer images") as caught:
        load_image(data)
    assert "16-bit samples" not in str(caught.value)
    prep = load_image(data, depth="reduce")
    assert prep.info.mode == "F" and prep.info.bit_depth == 16 and prep.info.color == "L"
    np.testing.assert_array_equal(prep.rgb[0, :, 0], [0, 0, 1, 127, 255, 255, 0])


def wide_samples(h: int = 5, w: int = 9) -> np.ndarray:
    """Random 16-bit RGB samples, with values where rounding differs from Pillow's high-byte
    truncation (255 -> 1, 65279 -> 254, 32896 -> 128, ...) in the first pixels."""
    out = rng().integers(0, 65536, (h, w, 3), dtype=np.uint16)
    out[0, 0], out[0, 1], out[1, 0] = (0, 255, 65535), (383, 384, 32767), (32896, 65279, 65280)
    return out


WIDE = wide_samples()
WIDE_ALPHA = WIDE[:, :, 0] // 2  # not opaque anywhere
WIDE_ALPHA[2, 3], WIDE_ALPHA[4, 8] = 65535, 0


@pytest.mark.parametrize("interlace", [False, True])
def test_rgb16_png_is_detected_and_rounded(interlace):
    data = png16(WIDE, 2, interlace=interlace)
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # Pillow hides the 16 bits
    with pytest.raises(ImageError, match="16-bit"):
        load_image(data)
    prep = load_image(data, depth="reduce")
    assert prep.info.mode == "RGB" and prep.info.bit_depth == 16 and prep.info.color == "RGB"
    np.testing.assert_array_equal(prep.rgb, reduce16(WIDE))
    assert not np.array_equal(prep.rgb, WIDE >> 8)  # really more than the high byte


def test_rgb16_png_trns_key():
    key = png_chunk(b"tRNS", struct.pack(">HHH", 383, 384, 32767))
    prep = load_image(png16(WIDE, 2, extra=key), depth="reduce")
    expected = np.full(WIDE.shape[:2], 255)
    expected[0, 1] = 0
    np.testing.assert_array_equal(prep.alpha, expected)


@pytest.mark.parametrize("interlace", [False, True])
def test_rgba16_png_alpha_reduced_then_kept(interlace):
    data = png16(np.dstack([WIDE, WIDE_ALPHA]), 6, interlace=interlace)
    prep = load_image(data, depth="reduce")
    assert prep.info.bit_depth == 16 and prep.info.has_alpha
    np.testing.assert_array_equal(prep.rgb, reduce16(WIDE))
    np.testing.assert_array_equal(prep.alpha, reduce16(WIDE_ALPHA))
    with pytest.raises(ImageError, match="16-bit"):
        load_image(data, alpha="flatten")


@pytest.mark.parametrize("interlace", [False, True])
def test_la16_png_is_gray(interlace):
    gray = WIDE[:, :, 1]
    data = png16(np.dstack([gray, WIDE_ALPHA]), 4, interlace=interlace)
    prep = load_image(data, depth="reduce")
    assert prep.info.color == "L" and prep.info.bit_depth == 16 and prep.info.has_alpha
    np.testing.assert_array_equal(prep.rgb[:, :, 2], reduce16(gray))
    np.testing.assert_array_equal(prep.alpha, reduce16(WIDE_ALPHA))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("channels", [3, 4])
def test_rgb16_tiff_is_detected_and_rounded(big_endian, channels):
    samples = WIDE if channels == 3 else np.dstack([WIDE, WIDE[:, :, 0]])
    data = tiff16(samples, big_endian)
    with pytest.raises(ImageError, match="16-bit"):
        load_image(data)
    prep = load_image(data, depth="reduce")
    assert prep.info.format == "TIFF" and prep.info.bit_depth == 16
    np.testing.assert_array_equal(prep.rgb, reduce16(WIDE))
    if channels == 4:
        np.testing.assert_array_equal(prep.alpha, reduce16(WIDE[:, :, 0]))


def test_ppm_maxval_65535_is_detected():
    data = b"P6 9 5 65535\n" + WIDE.astype(">u2").tobytes()
    with pytest.raises(ImageError, match="16-bit"):
        load_image(data)
    prep = load_image(data, depth="reduce")
    assert prep.info.bit_depth == 16
    assert np.abs(prep.rgb.astype(int) - reduce16(WIDE)).max() <= 1


def test_8bit_sources_have_bit_depth_8():
    assert load_image(encode(Image.fromarray(noise(2, 2)), "JPEG")).info.bit_depth == 8


# --------------------------------------------------------------------------- orientation


def oriented_png(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "PNG", exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exif_transpose(orientation):
    pixels = noise(3, 5)
    data = oriented_png(pixels, orientation)
    prep = load_image(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert prep.info.orientation == orientation
    np.testing.assert_array_equal(prep.rgb, expected)
    assert (prep.info.height, prep.info.width) == expected.shape[:2]


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_swaps_size(orientation):
    pixels = noise(4, 9)
    prep = load_image(oriented_png(pixels, orientation))
    assert (prep.info.width, prep.info.height) == (4, 9)
    assert prep.rgb.shape == (9, 4, 3) and prep.rgb.flags.c_contiguous
    # 6: rotate 90 degrees clockwise; 8: counter-clockwise.
    expected = np.rot90(pixels, k=-1 if orientation == 6 else 1)
    np.testing.assert_array_equal(prep.rgb, expected)


def test_exif_orientation_jpeg_and_alpha_rotate_together():
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(Image.fromarray(noise(8, 16)), "JPEG", exif=exif)
    prep = load_image(jpeg)
    assert prep.info.orientation == 6 and (prep.info.width, prep.info.height) == (8, 16)

    rgba = noise(2, 3, 4)
    exif[0x0112] = 8
    prep = load_image(encode(Image.fromarray(rgba), "PNG", exif=exif))
    np.testing.assert_array_equal(prep.alpha, np.rot90(rgba[:, :, 3], k=1))


def test_invalid_orientation_counts_as_1():
    pixels = noise(2, 3)
    prep = load_image(oriented_png(pixels, 9))
    assert prep.info.orientation == 1
    np.testing.assert_array_equal(prep.rgb, pixels)


# --------------------------------------------------------------------------- sizes and padding


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 7), (7, 1), (63, 65), (64, 64)])
def test_odd_sizes_pad_and_crop(h, w):
    pixels = noise(h, w)
    prep = load_image(encode(Image.fromarray(pixels)))
    assert prep.rgb.shape == (h, w, 3)
    padded = pad_to_multiple(prep.rgb, 16)
    ph, pw = padded.shape[:2]
    assert ph % 16 == 0 and pw % 16 == 0 and ph - h < 16 and pw - w < 16
    np.testing.assert_array_equal(padded[:h, :w], pixels)
    np.testing.assert_array_equal(padded[h:, :w], np.broadcast_to(pixels[-1:, :], (ph - h, w, 3)))
    np.testing.assert_array_equal(
        padded[:, w:], np.broadcast_to(padded[:, w - 1 : w], (ph, pw - w, 3))
    )
    np.testing.assert_array_equal(crop(padded, h, w), pixels)


def test_pad_2d_and_errors():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    p = pad_to_multiple(a, 4)
    assert p.shape == (4, 4) and p[3, 3] == a[1, 2]
    assert pad_to_multiple(a, 1) is a
    with pytest.raises(ValueError):
        pad_to_multiple(a, 0)
    with pytest.raises(ValueError):
        crop(a, 3, 3)


def test_padded_batch_is_pad_to_multiple_stacked_in_one_copy():
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((61, 70), (64, 65)))
    batch = padded_batch([a, b], 64)
    np.testing.assert_array_equal(batch, np.stack([pad_to_multiple(a, 64),
                                                   pad_to_multiple(b, 64)]))
    assert not np.shares_memory(padded_batch([a], 64), a)  # padded: a new array
    square = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    assert np.shares_memory(padded_batch([square], 64), square)  # no padding: no copy
    taller = rng.integers(0, 256, (130, 70, 3), dtype=np.uint8)  # pads to 192x128
    with pytest.raises(ValueError, match="does not pad"):
        padded_batch([a, taller], 64)


# --------------------------------------------------------------------------- limits and errors


def test_max_pixels_guard_message():
    data = encode(Image.fromarray(noise(10, 20)))
    with pytest.raises(ImageError) as info:
        load_image(data, max_pixels=199)
    assert str(info.value) == (
        "image is 20x10 = 200 pixels, above the limit of 199 pixels (decompression-bomb guard); "
        "pass a larger max_pixels / --max-pixels if this image is genuine"
    )
    assert load_image(data, max_pixels=200).rgb.shape == (10, 20, 3)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_huge_declared_header_is_refused_before_decoding():
    # 200000 x 200000 declared, a few bytes of data: refused from the header alone.
    data = png_bytes(200_000, 200_000, 8, 2, b"\x00" * 10)
    with pytest.raises(ImageError, match=r"200000x200000 = 40000000000 pixels, above the limit"):
        load_image(data)


def test_pillow_bomb_limit_does_not_interfere(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(noise(64, 64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(data).rgb.shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 10  # global state restored
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_pillow_globals_restored_after_errors():
    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError):
        load_image(b"garbage bytes")
    with pytest.raises(ImageError):
        load_image(encode(Image.fromarray(noise(4, 4))), max_pixels=1)
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_random_bytes_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot identify image file"):
        load_image(rng().integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")


def test_truncated_jpeg_is_refused_even_if_pillow_allows_it(monkeypatch):
    jpeg = encode(Image.fromarray(noise(64, 64)), "JPEG", quality=95)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="truncated"):
        load_image(jpeg[: len(jpeg) * 2 // 3])


def test_truncated_and_corrupt_png():
    png = encode(Image.fromarray(noise(32, 32)))
    with pytest.raises(ImageError):
        load_image(png[: len(png) // 2])
    corrupt = bytearray(png)
    corrupt[60:80] = b"\xff" * 20
    with pytest.raises(ImageError):
        load_image(bytes(corrupt))


def test_errors_are_sgarc_and_value_errors():
    with pytest.raises(SgarcError):
        load_image(b"nope")
    with pytest.raises(ValueError):
        load_image(b"nope")


def test_bad_policy_values():
    data = encode(Image.fromarray(noise(2, 2)))
    with pytest.raises(ValueError, match="alpha"):
        load_image(data, alpha="drop")
    with pytest.raises(ValueError, match="depth"):
        load_image(data, depth="truncate")
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(data, max_pixels=0)


def test_animated_gif_is_refused():
    frames = [Image.fromarray(noise(4, 4)).convert("P"), Image.new("P", (4, 4), 3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="2 frames"):
        load_image(buf.getvalue())


# --------------------------------------------------------------------------- output


def test_to_pil_rgb_and_rgba():
    rgb = noise(3, 4)
    alpha = noise(3, 4, None)
    im = to_pil(rgb)
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)
    im = to_pil(rgb, "RGB", alpha)
    assert im.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(im)[:, :, 3], alpha)


def test_to_pil_gray_is_rounded_mean():
    rgb = np.array([[[0, 0, 1], [0, 1, 1], [10, 20, 30], [255, 255, 254]]], np.uint8)
    im = to_pil(rgb, "L")
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), [[0, 1, 20, 255]])
    alpha = np.array([[1, 2, 3, 4]], np.uint8)
    im = to_pil(rgb, "L", alpha)
    assert im.mode == "LA"
    np.testing.assert_array_equal(np.asarray(im)[:, :, 1], alpha)
    with pytest.raises(ValueError):
        to_pil(rgb, "CMYK")
    with pytest.raises(ValueError):
        to_pil(rgb.astype(np.float32))


def test_gray_round_trip_through_to_pil():
    la = noise(5, 3, 2)
    prep = load_image(encode(Image.fromarray(la)))
    back = to_pil(prep.rgb, prep.info.color, prep.alpha)
    assert back.mode == "LA"
    np.testing.assert_array_equal(np.asarray(back), la)


@pytest.mark.parametrize(("name", "fmt"), [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.webp", "WEBP")])
def test_save_image_by_extension_is_atomic(tmp_path, name, fmt):
    pixels = noise(8, 8)
    path = tmp_path / name
    path.write_bytes(b"old")
    save_image(to_pil(pixels), path)
    assert os.listdir(tmp_path) == [name]
    with Image.open(path) as im:
        assert im.format == fmt
        if fmt == "PNG":
            np.testing.assert_array_equal(np.asarray(im), pixels)


def test_save_image_explicit_format_and_failure_leaves_nothing(tmp_path):
    path = tmp_path / "out.bin"
    save_image(to_pil(noise(2, 2)), path, format="png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    before = path.read_bytes()
    with pytest.raises(ImageError, match="JPEG"):
        save_image(to_pil(noise(2, 2), "RGB", noise(2, 2, None)), path, format="JPEG")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(ImageError, match="format"):
        save_image(to_pil(noise(2, 2)), tmp_path / "out.unknownext")
    assert os.listdir(tmp_path) == ["out.bin"]
