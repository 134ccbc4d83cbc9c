"""Archive fidelity: EXIF, ICC and XMP kept byte for byte, restored with a consistent orientation.

Sources are made with Pillow (JPEG, PNG and WebP carrying EXIF with GPS, orientation 6,
DateTimeOriginal and Make/Model, an RGB ICC profile built here, and XMP). What a file holds
is read back with the small container parsers below, independently of Pillow, so "byte for
byte" is checked against the bytes really in the files.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, PngImagePlugin

import pipeline.worker as worker
from codec.api import Codec, decode
from codec.bitstream import Bitstream, pack, parse
from codec.errors import BitstreamError, ImageError
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.metadata import (
    FIELD_LIMITS,
    MAX_META_BYTES,
    Metadata,
    RestoreReport,
    exif_for_output,
    save_params,
    unpack,
    xmp_for_output,
)
from jobs.cli import main
from pipeline import sink
from pipeline.plan import Shard
from pipeline.settings import EncodeSettings
from pipeline.storage import Storage
from tests.conftest import smooth_image

AMORTIZED = InferenceConfig(method="amortized")
FUZZ = settings(max_examples=300, deadline=None, database=None)
STORED_H, STORED_W = 24, 40  # as stored in the source; orientation 6 makes it 40 high, 24 wide
MAKE, MODEL, TAKEN = "Canon", "Canon EOS R5", "2021:05:06 07:08:09"
GPS = {1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 1.0)}


# ----------------------------------------------------------------------------- test data


def s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def icc_profile(space: str = "RGB", description: str = "Display P3 (sgarc test)") -> bytes:
    """A small valid ICC v2 display profile (matrix/TRC), Display P3 primaries for RGB."""

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    def curve(gamma: float) -> bytes:
        return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))

    text = description.encode("ascii") + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"cprt", b"text" + bytes(4) + b"No copyright, test data\0")]
    if space == "GRAY":
        tags.append((b"kTRC", curve(2.2)))
    else:  # RGB (a CMYK one is only a header label here: enough for the restore policy)
        tags += [(b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
                 (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)),
                 (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
                 (b"rTRC", curve(2.2)), (b"gTRC", curve(2.2)), (b"bTRC", curve(2.2))]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    space_code = {"RGB": b"RGB ", "GRAY": b"GRAY", "CMYK": b"CMYK"}[space]
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + bytes([2, 0x10, 0, 0])
              + b"mntr" + space_code + b"XYZ " + bytes(12) + b"acsp" + bytes(28)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


ICC = icc_profile()
XMP = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    'tiff:Orientation="6"><dc:title><rdf:Alt><rdf:li xml:lang="x-default">Tür am Fluss'
    '</rdf:li></rdf:Alt></dc:title></rdf:Description></rdf:RDF></x:xmpmeta>\n'
    '<?xpacket end="w"?>'
).encode("utf-8")
XMP_UPRIGHT = XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')


def exif_block(orientation: int = 6, endian: str = ">") -> bytes:
    """EXIF (TIFF structure, no Exif\\0\\0) with camera, date taken, GPS, orientation, size."""
    e = Image.Exif()
    e.endian = endian
    e[0x010F], e[0x0110], e[0x0112] = MAKE, MODEL, orientation
    sub = e.get_ifd(0x8769)
    sub[0x9003], sub[0xA002], sub[0xA003] = TAKEN, STORED_W, STORED_H
    e.get_ifd(0x8825).update(GPS)
    data = e.tobytes()
    assert data.startswith(b"Exif\x00\x00")
    return data[6:]


EXIF = exif_block()


def pixels(h: int = STORED_H, w: int = STORED_W) -> np.ndarray:
    return smooth_image(h, w, seed=3)


def source(fmt: str, exif: bytes | None = EXIF, icc: bytes | None = ICC,
           xmp: bytes | None = XMP, array: np.ndarray | None = None, **params) -> bytes:
    """A photo in ``fmt`` carrying the given metadata, written by Pillow."""
    im = Image.fromarray(pixels() if array is None else array)
    if exif is not None:
        params["exif"] = b"Exif\x00\x00" + exif if fmt == "JPEG" else exif
    if icc is not None:
        params["icc_profile"] = icc
    if xmp is not None and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=True)
        params["pnginfo"] = info
    elif xmp is not None:
        params["xmp"] = xmp
    if fmt == "WEBP":
        params.setdefault("lossless", True)
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


# ----------------------------------------------------------------------------- raw readers


def raw_metadata(data: bytes) -> dict[str, bytes]:
    """EXIF (TIFF structure), ICC and XMP exactly as stored in a JPEG, PNG or WebP file."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg_metadata(data)
    if data.startswith(b"\x89PNG"):
        return _png_metadata(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_metadata(data)
    raise AssertionError("not a JPEG, PNG or WebP file")


def _jpeg_metadata(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    icc: list[tuple[int, bytes]] = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        payload = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            out["exif"] = payload[6:]
        elif marker == 0xE1 and payload.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
            out["xmp"] = payload[29:]
        elif marker == 0xE2 and payload.startswith(b"ICC_PROFILE\x00"):
            icc.append((payload[12], payload[14:]))
        pos += 2 + length
    if icc:
        out["icc"] = b"".join(chunk for _, chunk in sorted(icc))
    return out


def _png_metadata(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"eXIf":
            out["exif"] = body
        elif kind == b"iCCP":
            out["icc"] = zlib.decompress(body.split(b"\0", 1)[1][1:])
        elif kind == b"iTXt" and body.startswith(b"XML:com.adobe.xmp\0"):
            rest = body.split(b"\0", 1)[1]
            text = rest[2:].split(b"\0", 2)[2]
            out["xmp"] = zlib.decompress(text) if rest[0] else text
        pos += 12 + length
    return out


def _webp_metadata(data: bytes) -> dict[str, bytes]:
    names = {b"EXIF": "exif", b"ICCP": "icc", b"XMP ": "xmp"}
    out: dict[str, bytes] = {}
    pos = 12
    while pos + 8 <= len(data):
        kind, length = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if kind in names:
            out[names[kind]] = data[pos + 8:pos + 8 + length]
        pos += 8 + length + (length & 1)
    return out


def read_exif(exif: bytes) -> tuple[Image.Exif, dict, dict]:
    e = Image.Exif()
    e.load(b"Exif\x00\x00" + exif)
    return e, dict(e.get_ifd(0x8769)), dict(e.get_ifd(0x8825))


def ifd0_entry_offset(exif: bytes, tag: int) -> int:
    """Byte offset of a tag's value field in IFD0, parsed here independently."""
    endian = "<" if exif[:2] == b"II" else ">"
    ifd = struct.unpack(endian + "I", exif[4:8])[0]
    (count,) = struct.unpack(endian + "H", exif[ifd:ifd + 2])
    for i in range(count):
        pos = ifd + 2 + 12 * i
        if struct.unpack(endian + "H", exif[pos:pos + 2])[0] == tag:
            return pos + 8
    raise AssertionError(f"tag {tag:#x} not in IFD0")


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec(one_thread, tiny_registry) -> Codec:
    return Codec(registry=tiny_registry, device="cpu")


def encode(codec: Codec, data: bytes, **kwargs) -> bytes:
    return codec.encode(load_image(data, **kwargs), AMORTIZED).data


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_metadata_is_taken_byte_for_byte(fmt):
    data = source(fmt)
    raw = raw_metadata(data)
    assert raw == {"exif": EXIF, "icc": ICC, "xmp": XMP}  # what the file really holds
    prep = load_image(data, name="IMG_0042.JPG")
    m = prep.metadata
    assert (m.exif, m.icc, m.xmp) == (EXIF, ICC, XMP)
    assert m.source_format == fmt and m.file_name == "IMG_0042.JPG"
    assert m.sha256 == hashlib.sha256(data).digest() and m.dropped == ()
    assert (prep.info.width, prep.info.height, prep.info.orientation) == (STORED_H, STORED_W, 6)


def test_file_name_defaults_to_the_path_and_is_absent_for_bytes(tmp_path):
    path = tmp_path / "Ferien 2021 – Strand.png"
    path.write_bytes(source("PNG"))
    assert load_image(path).metadata.file_name == "Ferien 2021 – Strand.png"
    assert load_image(path.read_bytes()).metadata.file_name is None
    assert load_image(path.read_bytes(), name="x.png").metadata.file_name == "x.png"
    with pytest.raises(ImageError, match="file name"):
        load_image(path.read_bytes(), name="a/b.png")
    with pytest.raises(ImageError, match="above its limit"):
        load_image(path.read_bytes(), name="n" * 1025)


def test_no_metadata_still_records_provenance(codec, tiny_registry):
    data = source("PNG", exif=None, icc=None, xmp=None)
    m = load_image(data).metadata
    assert m.kept == () and m.source_format == "PNG"
    stream = encode(codec, data)
    assert unpack(parse(stream).sections["META"]) == m


def test_wide_gamut_pixels_are_coded_as_stored():
    """No conversion to sRGB: the codec sees the stored values; the profile comes back."""
    array = pixels()
    data = source("PNG", array=array)
    prep = load_image(data)
    np.testing.assert_array_equal(np.rot90(array, k=-1), prep.rgb)  # orientation 6, unchanged
    assert prep.metadata.icc == ICC


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fmt_in", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_restored_on_decode(codec, tiny_registry, tmp_path, fmt_in, ext):
    data = source(fmt_in)
    stream = encode(codec, data, name="IMG_0042.JPG")
    decoded = decode(stream, registry=tiny_registry)
    assert decoded.metadata == load_image(data, name="IMG_0042.JPG").metadata
    out = tmp_path / f"back.{ext}"
    report = decoded.save(out)
    assert report.summary() == "metadata: exif, icc, xmp restored"
    raw = raw_metadata(out.read_bytes())
    assert raw["icc"] == ICC
    assert raw["xmp"] == XMP_UPRIGHT
    # the written EXIF is the stored one with its orientation (and pixel size) patched in place
    assert raw["exif"] == exif_for_output(EXIF, 6)
    assert len(raw["exif"]) == len(EXIF)
    e, sub, gps = read_exif(raw["exif"])
    assert e[0x0112] == 1 and e[0x010F] == MAKE and e[0x0110] == MODEL
    assert sub[0x9003] == TAKEN and gps == GPS
    with Image.open(out) as im:
        assert im.size == (STORED_H, STORED_W)  # upright: 24 wide, 40 high
        assert (sub[0xA002], sub[0xA003]) == im.size
        assert im.getexif()[0x0112] == 1


def test_written_exif_differs_only_in_orientation_and_size():
    for endian in "<>":
        stored = exif_block(6, endian)
        out = exif_for_output(stored, 6)
        diff = [i for i, (a, b) in enumerate(zip(stored, out, strict=True)) if a != b]
        value = ifd0_entry_offset(stored, 0x0112)
        fmt = endian + "H"
        assert struct.unpack(fmt, stored[value:value + 2])[0] == 6
        assert struct.unpack(fmt, out[value:value + 2])[0] == 1
        e, sub, _ = read_exif(out)
        assert (e[0x0112], sub[0xA002], sub[0xA003]) == (1, STORED_H, STORED_W)
        assert len(diff) <= 5 and any(value <= i < value + 2 for i in diff), diff
        # No rotation: the size stays; orientation 1 already: nothing changes at all.
        assert read_exif(exif_for_output(stored, 3))[1][0xA002] == STORED_W
        assert exif_for_output(exif_block(1, endian), 1) == exif_block(1, endian)


def test_exif_without_orientation_is_written_unchanged():
    e = Image.Exif()
    e[0x010F] = MAKE
    block = e.tobytes()[6:]
    assert exif_for_output(block, 1) == block


@pytest.mark.parametrize("text, expected", [
    (b'<a tiff:Orientation="8"/>', b'<a tiff:Orientation="1"/>'),
    (b"<a tiff:Orientation = '3'/>", b"<a tiff:Orientation = '1'/>"),
    (b"<tiff:Orientation>6</tiff:Orientation>", b"<tiff:Orientation>1</tiff:Orientation>"),
    (b"<x>no orientation</x>", b"<x>no orientation</x>"),
])
def test_xmp_orientation(text, expected):
    assert xmp_for_output(text) == expected


def test_strip_metadata(codec, tiny_registry, tmp_path):
    stream = encode(codec, source("JPEG"))
    decoded = decode(stream, registry=tiny_registry)
    out = tmp_path / "bare.jpg"
    assert decoded.save(out, strip_metadata=True).summary() == "metadata: stripped"
    assert raw_metadata(out.read_bytes()) == {}
    bare = decode(stream, registry=tiny_registry, read_metadata=False)
    assert bare.metadata is None
    np.testing.assert_array_equal(bare.rgb, decoded.rgb)


def test_formats_that_cannot_carry_metadata(codec, tiny_registry, tmp_path):
    decoded = decode(encode(codec, source("PNG")), registry=tiny_registry)
    report = decoded.save(tmp_path / "x.bmp")
    assert report.summary() == "metadata: exif, icc, xmp not supported by BMP, skipped"
    assert (tmp_path / "x.bmp").exists()
    report = decoded.save(tmp_path / "x.tif")
    assert report.summary() == "metadata: icc restored; exif, xmp not supported by TIFF, skipped"
    with Image.open(tmp_path / "x.tif") as im:
        assert im.info["icc_profile"] == ICC


def test_gray_stays_gray_with_its_profile(codec, tiny_registry, tmp_path):
    gray_icc = icc_profile("GRAY", "Gray Gamma 2.2 (sgarc test)")
    data = source("PNG", icc=gray_icc, array=pixels()[..., 0])
    decoded = decode(encode(codec, data), registry=tiny_registry)
    assert decoded.header.color == "L"
    assert decoded.save(tmp_path / "g.png").restored == ["exif", "icc", "xmp"]
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.info["icc_profile"] == gray_icc
    # an RGB profile is not attached to gray pixels (nor a gray one to RGB pixels)
    _, report = save_params(Metadata(icc=ICC), "PNG", "L")
    assert report.skipped == [("icc", "is for RGB pixels, the decoded image is L")]
    _, report = save_params(Metadata(icc=gray_icc), "JPEG", "RGB")
    assert report.skipped == [("icc", "is for GRAY pixels, the decoded image is RGB")]


def test_cmyk_profile_is_kept_but_not_attached_to_rgb(codec, tiny_registry, tmp_path):
    cmyk_icc = icc_profile("CMYK")
    cmyk = Image.fromarray(pixels()).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", icc_profile=cmyk_icc)
    decoded = decode(encode(codec, buf.getvalue()), registry=tiny_registry)
    assert decoded.metadata.icc == cmyk_icc
    report = decoded.save(tmp_path / "c.png")
    assert report.summary() == "metadata: icc is for CMYK pixels, the decoded image is RGB, skipped"


def test_jpeg_output_limits_skip_not_fail(tmp_path):
    big_exif = EXIF + bytes(70_000)  # a valid IFD0, then more than one APP1 segment holds
    params, report = save_params(Metadata(exif=big_exif, xmp=b"x" * 70_000), "JPEG", "RGB")
    assert params == {} and report.restored == []
    assert [name for name, _ in report.skipped] == ["exif", "xmp"]
    assert "more than a JPEG APP1 segment holds" in report.summary()
    params, report = save_params(Metadata(exif=big_exif, xmp=b"x" * 70_000), "PNG", "RGB")
    assert report.restored == ["exif", "xmp"]


def test_a_writer_refusing_metadata_never_fails_the_save(codec, tiny_registry, tmp_path,
                                                         monkeypatch):
    import codec.api as api

    def refused(meta, fmt, mode, orientation=1):  # what Pillow's JPEG writer refuses
        return {"exif": b"Exif\x00\x00" + bytes(70_000)}, RestoreReport(restored=["exif"])

    decoded = decode(encode(codec, source("JPEG")), registry=tiny_registry)
    monkeypatch.setattr(api, "save_params", refused)
    report = decoded.save(tmp_path / "r.jpg")
    assert report.restored == [] and report.skipped[0][0] == "exif"
    assert "refused by the JPEG writer" in report.summary()
    assert raw_metadata((tmp_path / "r.jpg").read_bytes()) == {}


# ----------------------------------------------------------------------------- malformed


def test_malformed_exif_and_icc_are_kept_and_do_not_break_decode(codec, tiny_registry, tmp_path):
    garbage_exif, garbage_icc = b"garbage, not a TIFF structure", b"not an ICC profile"
    data = source("JPEG", exif=garbage_exif, icc=garbage_icc, xmp=None)
    prep = load_image(data)
    assert (prep.metadata.exif, prep.metadata.icc) == (garbage_exif, garbage_icc)
    assert prep.info.orientation == 1
    decoded = decode(encode(codec, data), registry=tiny_registry)
    assert (decoded.metadata.exif, decoded.metadata.icc) == (garbage_exif, garbage_icc)
    out = tmp_path / "m.jpg"
    report = decoded.save(out)
    assert report.restored == []
    assert "exif malformed (no TIFF header), skipped" in report.summary()
    assert "icc malformed (no ICC header), skipped" in report.summary()
    assert raw_metadata(out.read_bytes()) == {}
    with Image.open(out) as im:
        assert im.size == (STORED_W, STORED_H)


def test_exif_with_a_broken_ifd0_is_refused_for_output():
    with pytest.raises(ValueError, match="IFD"):
        exif_for_output(b"MM\x00*\x00\x00\xff\xff")
    with pytest.raises(ValueError, match="past the end"):
        exif_for_output(b"II*\x00\x08\x00\x00\x00\xff\x00")


def test_corrupt_meta_section_is_a_clear_error_but_pixels_can_be_had(codec, tiny_registry,
                                                                    tmp_path, capsys):
    stream = encode(codec, source("PNG"))
    bs = parse(stream)
    bad = pack(Bitstream(bs.header, {**bs.sections, "META": b"\x01\x09\x00\x00\x00\x00"}))
    with pytest.raises(BitstreamError, match="corrupt metadata section: unknown field tag 9"):
        decode(bad, registry=tiny_registry)
    rgb = decode(bad, registry=tiny_registry, read_metadata=False).rgb
    np.testing.assert_array_equal(rgb, decode(stream, registry=tiny_registry).rgb)


# ----------------------------------------------------------------------------- oversized


def png_with_chunks(*chunks: tuple[bytes, bytes]) -> bytes:
    """A small PNG (pixels()) with extra chunks inserted before its image data."""
    data = source("PNG", exif=None, icc=None, xmp=None)
    idat = data.index(b"IDAT") - 4
    extra = b"".join(struct.pack(">I", len(body)) + kind + body
                     + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)
    return data[:idat] + extra + data[idat:]


def itxt_xmp(packet: bytes, compressed: bool) -> tuple[bytes, bytes]:
    text = zlib.compress(packet) if compressed else packet
    return b"iTXt", b"XML:com.adobe.xmp\0" + bytes([int(compressed), 0]) + b"\0\0" + text


def xmp_of_size(n: int) -> bytes:
    head, tail = b"<x:xmpmeta><a>", b"</a></x:xmpmeta>"
    return head + b"x" * (n - len(head) - len(tail)) + tail


@pytest.mark.parametrize("compressed", [False, True])
def test_oversized_xmp_is_refused_by_default_and_droppable(codec, tiny_registry, compressed):
    data = png_with_chunks(itxt_xmp(xmp_of_size(10 << 20), compressed))
    with pytest.raises(ImageError) as info:
        load_image(data)
    message = str(info.value)
    assert "XMP packet" in message and "drop-oversized" in message
    assert f"{FIELD_LIMITS['xmp']:,}" in message
    prep = load_image(data, metadata="drop-oversized")
    np.testing.assert_array_equal(prep.rgb, pixels())  # the image is not lost
    assert prep.metadata.xmp is None and prep.metadata.dropped == ("xmp",)
    assert prep.metadata.sha256 == hashlib.sha256(data).digest()  # of the file as it was
    decoded = decode(encode(codec, data, metadata="drop-oversized"), registry=tiny_registry)
    assert decoded.metadata.dropped == ("xmp",)


def test_icc_beyond_what_pillow_inflates(codec):
    """ICC over Pillow's 1 MiB PNG default but within sgarc's limit is kept; over it, dropped."""
    inside = ICC + bytes(int(1.5 * (1 << 20)))
    data = png_with_chunks((b"iCCP", b"big\0\0" + zlib.compress(inside)))
    before = PngImagePlugin.MAX_TEXT_CHUNK
    assert load_image(data).metadata.icc == inside
    assert before == PngImagePlugin.MAX_TEXT_CHUNK  # Pillow's global is restored
    huge = png_with_chunks((b"iCCP", b"big\0\0" + zlib.compress(bytes(3 << 20))))
    with pytest.raises(ImageError, match="ICC profile is more than"):
        load_image(huge)
    prep = load_image(huge, metadata="drop-oversized")
    assert prep.metadata.icc is None and prep.metadata.dropped == ("icc",)


def test_oversized_exif_and_uncarried_text(codec):
    data = source("PNG", exif=EXIF + bytes(FIELD_LIMITS["exif"]), icc=None, xmp=None)
    with pytest.raises(ImageError, match="EXIF block is 1,048,"):
        load_image(data)
    assert load_image(data, metadata="drop-oversized").metadata.dropped == ("exif",)
    # a huge comment (not carried) no longer makes the file unreadable
    comment = png_with_chunks((b"zTXt", b"Comment\0\0" + zlib.compress(bytes(5 << 20))))
    prep = load_image(comment)
    assert prep.metadata.dropped == () and prep.rgb.shape == (STORED_H, STORED_W, 3)


def test_whole_record_over_its_limit():
    exif = EXIF + bytes(FIELD_LIMITS["exif"] - len(EXIF))
    icc = ICC + bytes(FIELD_LIMITS["icc"] - len(ICC))
    data = source("PNG", exif=exif, icc=icc, xmp=xmp_of_size(FIELD_LIMITS["xmp"]))
    with pytest.raises(ImageError, match="together it is more than"):
        load_image(data)
    m = load_image(data, metadata="drop-oversized").metadata
    assert m.dropped == ("icc",) and m.exif == exif and len(m.pack()) <= MAX_META_BYTES


# ----------------------------------------------------------------------------- the record


def full_metadata() -> Metadata:
    return Metadata(source_format="JPEG", file_name="IMG_0042.JPG", sha256=bytes(range(32)),
                    exif=EXIF, icc=ICC, xmp=XMP)


def record(*fields: tuple[int, bytes], version: int = 1) -> bytes:
    return bytes([version]) + b"".join(struct.pack(">BI", t, len(v)) + v for t, v in fields)


def test_record_round_trip_and_layout():
    m = full_metadata()
    payload = m.pack()
    assert unpack(payload) == m and unpack(payload).pack() == payload
    assert payload[:10] == b"\x01" + struct.pack(">BI", 1, 4) + b"JPEG"  # version, format
    dropped = Metadata(sha256=bytes(32), dropped=("icc", "xmp"))
    assert dropped.pack().endswith(struct.pack(">BI", 7, 2) + bytes([5, 6]))
    assert unpack(dropped.pack()) == dropped


@pytest.mark.parametrize("payload, message", [
    (b"", "empty"),
    (b"\x02", "unsupported metadata record version 2"),
    (b"\x01", "no fields"),
    (b"\x01\x04\x00\x00", "truncated field header"),
    (record((8, b"x")), "unknown field tag 8"),
    (record((0, b"x")), "unknown field tag 0"),
    (record((4, b"a"), (4, b"b")), "field exif repeated or out of order"),
    (record((5, b"a"), (4, b"b")), "field exif repeated or out of order"),
    (b"\x01\x04\x00\x00\x00\x09abc", "field exif claims 9 bytes, only 3 remain"),
    (b"\x01\x04\xff\xff\xff\xffabc", "claims 4294967295 bytes"),
    (record((4, b"")), "field exif is empty"),
    (record((3, bytes(31))), "field sha256 is 31 bytes, expected 32"),
    (record((1, b"jpeg")), "field format"),
    (record((1, b"A" * 17)), "above its limit of 16"),
    (record((2, b"dir/name.jpg")), "contains NUL or '/'"),
    (record((2, b"\xff\xfe")), "field name is not UTF-8"),
    (record((7, bytes([6, 5]))), "not increasing tags"),
    (record((7, bytes([3]))), "not increasing tags"),
    (record((4, b"II*\0"), (7, bytes([4]))), "field exif is both present and listed as dropped"),
    (record((6, b"x" * (FIELD_LIMITS["xmp"] + 1))), "field xmp is 1048577 bytes, above its limit"),
    (b"\x01" + bytes(MAX_META_BYTES), f"above the limit of {MAX_META_BYTES}"),
])
def test_record_errors(payload, message):
    with pytest.raises(BitstreamError, match="corrupt metadata section") as info:
        unpack(payload)
    assert message in str(info.value)


def test_pack_refuses_what_unpack_would():
    with pytest.raises(ValueError, match="sha256"):
        Metadata(sha256=b"short").pack()
    with pytest.raises(ValueError, match="no fields"):
        Metadata().pack()
    with pytest.raises(ValueError, match="both present"):
        Metadata(exif=b"x", dropped=("exif",)).pack()


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_record_arbitrary_bytes(data):
    try:
        m = unpack(data)
    except BitstreamError:
        return
    assert m.pack() == data  # anything accepted is canonical


_FIELD = st.tuples(st.integers(0, 9), st.binary(max_size=40))


@FUZZ
@given(fields=st.lists(_FIELD, max_size=8), cut=st.integers(0, 400), version=st.integers(0, 2))
def test_fuzz_record_structured(fields, cut, version):
    data = record(*fields, version=version)
    for candidate in (data, data[:cut]):
        try:
            m = unpack(candidate)
        except BitstreamError:
            continue
        assert m.pack() == candidate


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1,
                      max_size=4))
def test_fuzz_record_mutations(edits):
    data = bytearray(full_metadata().pack())
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        m = unpack(bytes(data))
    except BitstreamError:
        return
    assert m.pack() == bytes(data)
    save_params(m, "JPEG", "RGB")  # whatever was accepted restores without raising


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_rows_record_metadata(tmp_path, tiny_registry, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "trip").mkdir(parents=True)
    (src / "trip" / "IMG_0042.jpg").write_bytes(source("JPEG"))
    (src / "plain.png").write_bytes(source("PNG", exif=None, icc=None, xmp=None))
    (src / "big.png").write_bytes(png_with_chunks(itxt_xmp(xmp_of_size(2 << 20), False)))
    monkeypatch.setattr(worker, "Codec", lambda model, device=None, rate=None:
                        Codec(registry=tiny_registry, device="cpu"))

    def rows(policy: str) -> dict[str, dict]:
        settings = EncodeSettings(method="amortized", metadata=policy)
        enc = worker.ShardEncoder(str(src), str(out), None, settings, "fp", device="cpu",
                                  prefetch=1)
        refs = Storage(str(src)).list_images()
        enc.process(Shard(f"s-{policy}", refs), policy)
        table = sink.read_part(Storage(str(out)).read_bytes(sink.part_key(policy, f"s-{policy}")))
        return {r["source_key"]: r for r in table.to_pylist()}

    keep = rows("keep")
    jpeg = keep["trip/IMG_0042.jpg"]
    stream = Storage(str(out)).read_bytes(jpeg["bitstream_key"])
    meta = unpack(parse(stream).sections["META"])
    assert meta.file_name == "IMG_0042.jpg" and meta.exif == EXIF
    assert jpeg["metadata_bytes"] == len(parse(stream).sections["META"])
    assert jpeg["has_icc"] is True and jpeg["metadata_dropped"] is None
    assert keep["plain.png"]["has_icc"] is False and keep["plain.png"]["metadata_bytes"] > 0
    big = keep["big.png"]
    assert big["status"] == "error" and big["error_stage"] == "decode"
    assert "XMP packet" in big["error"] and "drop-oversized" in big["error"]
    dropped = rows("drop-oversized")["big.png"]
    assert dropped["status"] == "ok" and dropped["metadata_dropped"] == "xmp"


def test_metadata_policy_is_not_in_the_fingerprint():
    assert (EncodeSettings(metadata="drop-oversized").fingerprint()
            == EncodeSettings().fingerprint())
    assert EncodeSettings().resolved()["metadata_version"] == 1
    with pytest.raises(ValueError, match="metadata"):
        EncodeSettings(metadata="strip")


# ----------------------------------------------------------------------------- CLI


def test_cli_encode_info_decode(tmp_path, capsys):
    photo = tmp_path / "IMG_0042.JPG"
    photo.write_bytes(source("JPEG", quality=95))
    stream = tmp_path / "p.sga"
    assert main(["encode", str(photo), str(stream), "--method", "amortized"]) == 0
    assert "metadata kept: exif" in capsys.readouterr().out
    assert main(["info", str(stream)]) == 0
    info = capsys.readouterr().out
    assert "source:      JPEG, IMG_0042.JPG" in info
    assert hashlib.sha256(photo.read_bytes()).hexdigest() in info
    assert f"{MAKE} {MODEL}, taken {TAKEN}, GPS 52.52014 N, 13.40028 E, orientation 6" in info
    assert '"Display P3 (sgarc test)" (RGB)' in info and f"xmp:         {len(XMP)} bytes" in info
    for name, expected in [("o.jpg", "metadata: exif, icc, xmp restored"),
                           ("o.bmp", "metadata: exif, icc, xmp not supported by BMP, skipped")]:
        assert main(["decode", str(stream), str(tmp_path / name)]) == 0
        assert capsys.readouterr().out.rstrip().endswith(expected)
    assert raw_metadata((tmp_path / "o.jpg").read_bytes())["icc"] == ICC
    assert main(["decode", str(stream), str(tmp_path / "s.jpg"), "--strip-metadata"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("metadata: stripped")
    assert raw_metadata((tmp_path / "s.jpg").read_bytes()) == {}


def test_cli_metadata_errors(tmp_path, capsys):
    big = tmp_path / "big.png"
    big.write_bytes(png_with_chunks(itxt_xmp(xmp_of_size(2 << 20), True)))
    assert main(["encode", str(big), str(tmp_path / "b.sga"), "--method", "amortized"]) == 2
    err = capsys.readouterr().err
    assert "XMP packet" in err and "--metadata drop-oversized" in err
    assert not (tmp_path / "b.sga").exists()
    assert main(["encode", str(big), str(tmp_path / "b.sga"), "--method", "amortized",
                 "--metadata", "drop-oversized"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "b.sga")]) == 0
    assert "dropped:     xmp (over the limit at encode)" in capsys.readouterr().out
    # a stream whose META is malformed: decode says so; --strip-metadata still gives pixels
    bs = parse((tmp_path / "b.sga").read_bytes())
    bad = tmp_path / "bad.sga"
    bad.write_bytes(pack(Bitstream(bs.header, {**bs.sections, "META": b"\x01"})))
    assert main(["decode", str(bad), str(tmp_path / "x.png")]) == 2
    assert "corrupt metadata section: no fields" in capsys.readouterr().err
    assert main(["info", str(bad)]) == 2
    assert main(["decode", str(bad), str(tmp_path / "x.png"), "--strip-metadata"]) == 0
    assert Path(tmp_path / "x.png").exists()


def test_profile_built_here_is_a_valid_icc():
    profile = ImageCms.ImageCmsProfile(io.BytesIO(ICC))
    assert ImageCms.getProfileDescription(profile).strip() == "Display P3 (sgarc test)"
