"""Archive routes (codec.routes, format version 3): the floor, "never bigger than the
source", and the bit-exact JPEG route, on real encodes with the tiny test model."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from codec import jpegxl, routes
from codec.api import Codec, decode
from codec.bitstream import Bitstream, Header, pack, parse
from codec.errors import BitstreamError
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.metadata import unpack
from codec.metrics import psnr
from tests.conftest import smooth_image

AMORTIZED = InferenceConfig(method="amortized")
pytestmark = pytest.mark.usefixtures("one_thread")


def encoded(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_jpeg() -> bytes:
    """A photo-like JPEG with EXIF (orientation 6: stored sideways) and an ICC profile."""
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "sgarc test camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encoded(smooth_image(48, 64, seed=3), "JPEG", quality=93, exif=exif.tobytes(),
                   icc_profile=icc)


@pytest.fixture(scope="module")
def codec(tiny_registry) -> Codec:
    return Codec(registry=tiny_registry, device="cpu")


def route(codec: Codec, source: bytes, floor: float | None, **load) -> routes.Routed:
    image = load_image(source, name="photo", **load)
    return routes.encode(codec, image, source, routes.Policy(floor), AMORTIZED)


# ----------------------------------------------------------------------------- guarantees


def test_jpeg_source_comes_back_bit_exact(codec, tmp_path):
    source = exif_jpeg()
    r = route(codec, source, floor=60.0)  # out of the untrained model's reach
    assert r.route == "jpeg-lossless" and r.floor_met and len(r.data) < len(source)
    bs = parse(r.data)
    assert bs.header.version == 3 and bs.header.model_id == "" and bs.header.route == r.route
    assert set(bs.sections) == {"JXLJ", "META"}
    meta = unpack(bs.sections["META"])
    assert meta.sha256 == hashlib.sha256(source).digest() and meta.exif is None  # in the JPEG
    decoded = decode(r.data, registry=codec.registry)
    assert decoded.source == source
    decoded.save(tmp_path / "back.jpg")
    assert (tmp_path / "back.jpg").read_bytes() == source
    assert hashlib.sha256((tmp_path / "back.jpg").read_bytes()).digest() == meta.sha256
    # other formats: the source's pixels (upright), with its metadata
    pixels = load_image(source)
    assert np.array_equal(decoded.rgb, pixels.rgb)
    assert (decoded.header.width, decoded.header.height) == (48, 64)  # rotated upright
    assert decoded.metadata.exif is not None and decoded.metadata.icc is not None
    report = decoded.save(tmp_path / "back.png")
    assert "exif" in report.restored
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), pixels.rgb)


@pytest.mark.parametrize("floor", [None, 20.0, 60.0])
@pytest.mark.parametrize("case", ["one-pixel.png", "noise.png", "noise.jpg", "tiny.jpg",
                                  "gray.png"])
def test_never_bigger_than_the_source(codec, case, floor):
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    source = {
        "one-pixel.png": encoded(np.array([[[200, 10, 30]]], np.uint8), "PNG"),
        "noise.png": encoded(noise, "PNG"),
        "noise.jpg": encoded(noise, "JPEG", quality=100),
        "tiny.jpg": encoded(np.full((2, 3, 3), 90, np.uint8), "JPEG"),
        "gray.png": encoded(np.full((8, 8), 17, np.uint8), "PNG"),
    }[case]
    r = route(codec, source, floor)
    assert len(r.data) <= len(source) + routes.MAX_OVERHEAD
    decoded = decode(r.data, registry=codec.registry)
    assert decoded.rgb.shape == load_image(source).rgb.shape
    if r.route == "original":
        assert len(r.data) == len(source) + routes.ORIGINAL_OVERHEAD
        assert decoded.source == source


def test_the_one_pixel_png_is_kept_as_it_was(codec):
    """The issue's example: a 69-byte PNG grew to a 151-byte learned stream and was kept."""
    source = encoded(np.array([[[200, 10, 30]]], np.uint8), "PNG")
    r = route(codec, source, None)
    assert len(source) == 69 and len(r.learned.data) > len(source) + routes.MAX_OVERHEAD
    assert r.route == "original" and len(r.data) == 100


@pytest.mark.parametrize("floor", [1.0, 12.0, 25.0, 60.0])
def test_floor_is_respected_by_every_route(codec, floor):
    """Whatever the route, the stored stream's decoded pixels reach the floor."""
    for source in (encoded(smooth_image(40, 56), "PNG"), exif_jpeg()):
        image = load_image(source)
        r = route(codec, source, floor)
        decoded = decode(r.data, registry=codec.registry)
        measured = psnr(decoded.rgb, image.rgb)
        assert measured >= floor and r.floor_met, (r.route, measured)
        assert r.route != "learned" or r.learned.psnr >= floor
        if r.learned.psnr < floor:
            assert r.route != "learned"


def test_learned_wins_when_it_meets_the_floor_and_is_smaller(codec):
    source = encoded(smooth_image(64, 64), "PNG")
    r = route(codec, source, floor=1.0)
    assert r.route == "learned" and r.data == r.learned.data
    assert parse(r.data).header.version == 1  # learned streams are what they were


def test_variable_rate_model_codes_at_the_floor(tiny_vr_registry):
    from tests.conftest import TINY_VR_ID

    vr = Codec(TINY_VR_ID, registry=tiny_vr_registry, device="cpu")
    source = encoded(smooth_image(40, 56), "PNG")
    image = load_image(source)
    top = vr.at_rate(vr.lm.variable.max_rate_index).encode(image, AMORTIZED).psnr
    low = vr.at_rate(0).encode(image, AMORTIZED).psnr
    floor = (top + low) / 2
    r = routes.encode(vr, image, source, routes.Policy(floor), AMORTIZED)
    assert r.learned.target == "psnr" and r.learned.target_value == floor
    if r.route == "learned":
        assert r.learned.psnr >= floor and parse(r.data).header.version == 2


def test_learned_target_combines_target_and_floor():
    from codec.targets import Target

    floor = routes.Policy(38.0)
    assert routes.learned_target(floor, None, True) == Target("psnr", 38.0)
    assert routes.learned_target(floor, None, False) is None  # one rate point
    assert routes.learned_target(floor, Target("psnr", 35.0), True) == Target("psnr", 38.0)
    assert routes.learned_target(floor, Target("psnr", 40.0), True) == Target("psnr", 40.0)
    assert routes.learned_target(floor, Target("bpp", 0.5), True) == Target("bpp", 0.5)
    assert routes.learned_target(routes.Policy(), None, True) is None
    with pytest.raises(ValueError, match="min_psnr"):
        routes.Policy(0.0)


# ----------------------------------------------------------------------------- refinement


def _routed(route_name: str, size: int, psnr_db: float, rd_loss: float | None = None,
            floor: float | None = None) -> routes.Routed:
    from types import SimpleNamespace

    learned = SimpleNamespace(rd_loss=rd_loss, psnr=psnr_db)
    return routes.Routed(route_name, b"x" * size, 8, 8, 1000, psnr_db, floor, learned)


def test_refinement_never_worsens_a_stored_stream():
    floor = routes.Policy(38.0)
    lossless = routes.Stored("jpeg-lossless", bytes=800, psnr=100.0)
    assert not routes.improves(_routed("learned", 900, 39.0, floor=38.0), lossless, floor)
    assert routes.improves(_routed("learned", 700, 39.0, floor=38.0), lossless, floor)
    assert not routes.improves(_routed("original", 1031, 100.0, floor=38.0), lossless, floor)
    below = routes.Stored("learned", bytes=300, psnr=36.0, rd_loss=1.0)
    assert routes.improves(_routed("jpeg-lossless", 800, 100.0, floor=38.0), below, floor)
    met = routes.Stored("learned", bytes=300, psnr=39.0, rd_loss=1.0)
    assert not routes.improves(_routed("jpeg-lossless", 800, 100.0, floor=38.0), met, floor)
    # a new stream below the floor never replaces anything
    assert not routes.improves(_routed("learned", 10, 30.0, floor=38.0), below, floor)
    # without a floor two learned streams compare by RD loss, as before routes existed
    none = routes.Policy()
    old = routes.Stored("learned", bytes=300, psnr=30.0, rd_loss=1.0)
    assert routes.improves(_routed("learned", 350, 31.0, rd_loss=0.9), old, none)
    assert not routes.improves(_routed("learned", 250, 29.0, rd_loss=1.1), old, none)


# ----------------------------------------------------------------------------- the format


def with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def v3_stream(sections, *, route_code=2, model_id=b"", width=1, height=1) -> bytes:
    body = struct.pack(">4sBIIBBBBB", b"SGAC", 3, width, height, 0, 1, 8, 0, len(model_id))
    body += model_id + bytes([route_code])
    for tag, payload in sections:
        body += struct.pack(">4sI", tag, len(payload)) + payload
    return with_crc(body)


def test_version_3_layout_is_canonical():
    png = encoded(np.array([[[200, 10, 30]]], np.uint8), "PNG")
    data = v3_stream([(b"ORIG", png)])
    assert len(data) == len(png) + routes.ORIGINAL_OVERHEAD
    bs = parse(data)
    assert bs.header == Header("", 1, 1, route="original") and pack(bs) == data
    assert decode(data).source == png


@pytest.mark.parametrize("stream, message", [
    (v3_stream([(b"ORIG", b"x")], route_code=0), "route 0"),
    (v3_stream([(b"ORIG", b"x")], route_code=3), "unknown route code 3"),
    (v3_stream([(b"ORIG", b"x")], model_id=b"tiny-test"), "no model id"),
    (v3_stream([(b"ZLAT", b""), (b"YLAT", b"")]), "does not belong in a original stream"),
    (v3_stream([(b"JXLJ", b"x")]), "does not belong"),
    (v3_stream([(b"META", b"\x01")]), "missing section(s) ORIG"),
    (v3_stream([], route_code=1), "missing section(s) JXLJ"),
    (v3_stream([(b"META", b"\x01"), (b"ORIG", b"x")]), "out of order"),
    (with_crc(struct.pack(">4sBIIBBBBB", b"SGAC", 3, 1, 1, 0, 1, 8, 0, 0)), "truncated"),
    (with_crc(struct.pack(">4sBIIBBBBB", b"SGAC", 1, 1, 1, 0, 1, 8, 0, 0) + b"\x02"),
     "invalid model id length 0"),
])
def test_version_3_header_errors(stream, message):
    with pytest.raises(BitstreamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(stream)


def test_learned_sections_are_refused_in_source_streams():
    with pytest.raises(ValueError, match="do not belong"):
        pack(Bitstream(Header("", 1, 1, route="original"), {"ORIG": b"x", "ALPH": b"y"}))
    with pytest.raises(BitstreamError, match="no model id"):
        pack(Bitstream(Header("tiny-test", 1, 1, route="original"), {"ORIG": b"x"}))


def _repacked(data: bytes, **sections: bytes) -> bytes:
    bs = parse(data)
    return pack(Bitstream(bs.header, {**bs.sections, **sections}))


def test_corrupt_jpeg_xl_payload_is_a_clear_error(codec):
    source = exif_jpeg()
    data = route(codec, source, floor=60.0).data
    payload = parse(data).sections["JXLJ"]
    flipped = bytearray(payload)
    for i in range(len(flipped) // 2, len(flipped), 97):
        flipped[i] ^= 0x5A
    other = jpegxl.transcode(encoded(smooth_image(30, 20), "JPEG"))
    cases = {
        "flipped": bytes(flipped),
        "truncated": payload[: len(payload) // 2],
        "garbage": b"not a JPEG XL file at all",
        "empty": b"",
        "other size": other,
        "other image, same size": jpegxl.transcode(encoded(smooth_image(64, 48, 9), "JPEG")),
    }
    for name, bad in cases.items():
        with pytest.raises(BitstreamError, match="corrupt") as info:
            decode(_repacked(data, JXLJ=bad))
        assert "JPEG XL" in str(info.value) or "SHA-256" in str(info.value), name
    # without reading META (no hash to compare), a valid other image still fails its size
    with pytest.raises(BitstreamError, match="declares a 20x30 image"):
        decode(_repacked(data, JXLJ=other), read_metadata=False)


def test_codestream_size_reads_every_size_header_form():
    for w, h in [(1, 1), (8, 8), (16, 8), (33, 17), (100, 75), (256, 144), (513, 1000)]:
        jxl = jpegxl.transcode(encoded(np.zeros((h, w, 3), np.uint8), "JPEG"))
        assert jpegxl.codestream_size(jxl) == (w, h)
    with pytest.raises(BitstreamError, match="truncated box header"):
        jpegxl.codestream_size(jxl[:14])


def test_corrupt_original_payload_is_a_clear_error():
    png = encoded(smooth_image(12, 10), "PNG")
    good = v3_stream([(b"ORIG", png)], width=10, height=12)
    assert decode(good).rgb.shape == (12, 10, 3)
    with pytest.raises(BitstreamError, match="header says 11x12"):
        decode(v3_stream([(b"ORIG", png)], width=11, height=12))
    with pytest.raises(BitstreamError, match="corrupt original payload"):
        decode(v3_stream([(b"ORIG", png[:40])], width=10, height=12))
    meta = bytes([1, 3, 0, 0, 0, 32]) + hashlib.sha256(b"another file").digest()
    with pytest.raises(BitstreamError, match="SHA-256"):
        decode(v3_stream([(b"ORIG", png), (b"META", meta)], width=10, height=12))
