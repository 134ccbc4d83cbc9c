"""The bitstream reader on valid, corrupt and adversarial input (format: docs/bitstream.md).

Every malformed stream must raise BitstreamError (never another exception, never a hang),
with a message that names the problem. Valid streams come from one real encode with the
tiny test model; malformed ones are built from it, re-packed or written byte by byte with a
recomputed CRC32 so that the check under test, not the checksum, is what fires.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import time
import tracemalloc
import zlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

import codec.api as api
from codec import coding
from codec.api import Codec, decode, latent_shapes
from codec.bitstream import (
    FORMAT_MAX_PIXELS,
    FORMAT_VERSION,
    MAGIC,
    Bitstream,
    Header,
    latent_grids,
    pack,
    pack_alpha,
    parse,
)
from codec.errors import BitstreamError
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.registry import load
from tests.conftest import TINY_ID, TINY_VR_ID, smooth_image

HEIGHT, WIDTH = 40, 56
FUZZ_MAX_PIXELS = 10_000
TINY_BYTES = TINY_ID.encode()
FUZZ = settings(max_examples=300, deadline=None, database=None)
FUZZ_HEADERS = settings(max_examples=200, deadline=None, database=None)
# What one decode of a forged stream may take, whatever size its header declares: the work
# is bounded by what the stream's sections can hold (docs/bitstream.md, Work bound).
DECODE_SECONDS = 5.0
DECODE_TRACED_BYTES = 48 << 20  # numpy's allocations (tracemalloc sees them, not torch's)


# ----------------------------------------------------------------------------- helpers


def with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def raw_stream(sections=(), *, width=WIDTH, height=HEIGHT, model_id=TINY_BYTES,
               magic=MAGIC, version=1, color=0, orientation=1, depth=8, pad=0,
               id_len=None) -> bytes:
    """A stream written field by field (no validation), with a valid CRC.

    sections: (tag, payload) or (tag, payload, declared_length) tuples, in the given order.
    """
    body = struct.pack(">4sB", magic, version)
    body += struct.pack(">IIBBBBB", width, height, color, orientation, depth, pad,
                        len(model_id) if id_len is None else id_len)
    body += model_id
    for tag, payload, *declared in sections:
        body += struct.pack(">4sI", tag, declared[0] if declared else len(payload)) + payload
    return with_crc(body)


def repack(data: bytes, header: Header | None = None, **sections: bytes | None) -> bytes:
    """Re-pack a valid stream with some sections replaced (None removes one)."""
    bs = parse(data)
    merged = {**bs.sections, **sections}
    return pack(Bitstream(header or bs.header,
                          {k: v for k, v in merged.items() if v is not None}))


def rejects(data: bytes, registry, *keywords: str, **kwargs) -> BitstreamError:
    """decode must raise BitstreamError (nothing else) whose message has one of keywords."""
    with pytest.raises(BitstreamError) as info:
        decode(data, registry=registry, **kwargs)
    message = str(info.value)
    assert any(k in message for k in keywords), message
    return info.value


def symbol_counts(registry, data: bytes) -> tuple[int, int]:
    """Symbols in the z and y sections of the tiny model's stream `data` (its layout's)."""
    z_shape, y_shape = latent_shapes(load(TINY_ID, registry), WIDTH, HEIGHT,
                                     parse(data).header.pad_mode)
    return int(np.prod(z_shape)), int(np.prod(y_shape))


def random_words(rng: np.random.Generator, n: int) -> bytes:
    """n random big-endian words, the last one non-zero (so it is not trivially invalid)."""
    words = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    if n:
        words[-1] |= 1
    return words.astype(">u4").tobytes()


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stream(one_thread, tiny_registry) -> bytes:
    """One real stream of a 56x40 image, encoded once for the whole module."""
    buf = io.BytesIO()
    Image.fromarray(smooth_image(HEIGHT, WIDTH)).save(buf, format="PNG")
    image = load_image(buf.getvalue())
    codec = Codec(registry=tiny_registry, device="cpu")
    return codec.encode(image, InferenceConfig(method="amortized")).data


@pytest.fixture(scope="module")
def vr_stream(one_thread, tiny_vr_registry) -> bytes:
    """The same image coded by the tiny variable-rate model at rate point 32 (version 2)."""
    buf = io.BytesIO()
    Image.fromarray(smooth_image(HEIGHT, WIDTH)).save(buf, format="PNG")
    codec = Codec(TINY_VR_ID, registry=tiny_vr_registry, device="cpu", rate=32)
    return codec.encode(load_image(buf.getvalue()), InferenceConfig(method="amortized")).data


@pytest.fixture(scope="module")
def alpha_plane() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)


# ----------------------------------------------------------------------------- valid streams


@pytest.mark.parametrize(("width", "height", "layout", "grids"), [
    (56, 40, "replicate", ((1, 1), (4, 4))),
    (56, 40, "tight", ((1, 1), (3, 4))),
    (56, 40, "tight+1", ((1, 1), (4, 4))),  # clamped to y's grid
    (481, 321, "replicate", ((6, 8), (24, 32))),
    (481, 321, "tight", ((6, 8), (21, 31))),
    (481, 321, "tight+1", ((6, 8), (22, 32))),
    (1, 1, "tight", ((1, 1), (1, 1))),
])
def test_latent_grids_of_each_layout(width, height, layout, grids):
    assert latent_grids(width, height, layout) == grids


def test_a_stream_codes_its_layouts_grid(stream, tiny_registry):
    """The tiny model's 56x40 stream is tight or tight+1; a header claiming the other
    layout (another number of y symbols) does not decode."""
    bs = parse(stream)
    assert bs.header.pad_mode in ("tight", "tight+1")
    decode(stream, registry=tiny_registry)
    other = "tight" if bs.header.pad_mode == "tight+1" else "tight+1"
    forged = pack(Bitstream(dataclasses.replace(bs.header, pad_mode=other), bs.sections))
    with pytest.raises(BitstreamError):
        decode(forged, registry=tiny_registry)


def test_round_trip(stream, tiny_registry):
    bs = parse(stream)
    assert pack(bs) == stream
    assert bs.header == Header(TINY_ID, WIDTH, HEIGHT, pad_mode=bs.header.pad_mode)
    assert list(bs.sections) == ["ZLAT", "YLAT", "META"]  # provenance of the PNG source
    decoded = decode(stream, registry=tiny_registry)
    assert decoded.rgb.shape == (HEIGHT, WIDTH, 3) and decoded.rgb.dtype == np.uint8
    assert decoded.alpha is None
    again = decode(pack(parse(stream)), registry=tiny_registry)
    assert np.array_equal(again.rgb, decoded.rgb)


def test_round_trip_with_alpha(stream, tiny_registry, alpha_plane):
    data = repack(stream, ALPH=pack_alpha(alpha_plane.tobytes()))
    assert pack(parse(data)) == data
    assert list(parse(data).sections) == ["ZLAT", "YLAT", "ALPH", "META"]
    decoded = decode(data, registry=tiny_registry)
    assert np.array_equal(decoded.alpha, alpha_plane)
    assert np.array_equal(decoded.rgb, decode(stream, registry=tiny_registry).rgb)


def test_decoder_max_pixels_at_the_limit(stream, tiny_registry):
    decoded = decode(stream, max_pixels=WIDTH * HEIGHT, registry=tiny_registry)
    assert decoded.rgb.shape == (HEIGHT, WIDTH, 3)


# ----------------------------------------------------------------------------- framing


def test_empty(tiny_registry):
    rejects(b"", tiny_registry, "truncated")


def test_truncated_at_every_length(stream, tiny_registry):
    for n in range(len(stream)):
        rejects(stream[:n], tiny_registry, "truncated", "checksum")


def test_every_single_bit_flip(stream, tiny_registry):
    # CRC32 detects every single-bit error, so no flip can decode to a different image.
    for bit in range(8 * len(stream)):
        data = bytearray(stream)
        data[bit // 8] ^= 1 << (bit % 8)
        rejects(bytes(data), tiny_registry, "checksum", "not an sgarc", "version")


def test_wrong_magic(stream, tiny_registry):
    rejects(b"SGAX" + stream[4:], tiny_registry, "not an sgarc")
    rejects(with_crc(b"\x89PNG" + stream[4:-4]), tiny_registry, "not an sgarc")


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 255])
def test_wrong_version(stream, tiny_registry, version):
    data = with_crc(stream[:4] + bytes([version]) + stream[5:-4])
    exc = rejects(data, tiny_registry, "unsupported format version")
    assert str(version) in str(exc)


def test_bad_checksum(stream, tiny_registry):
    crc = struct.unpack(">I", stream[-4:])[0]
    rejects(stream[:-4] + struct.pack(">I", crc ^ 0xFFFFFFFF), tiny_registry, "checksum")


# ----------------------------------------------------------------------------- header


def test_unknown_model_id(stream, tiny_registry):
    data = repack(stream, Header("no-such-model", WIDTH, HEIGHT))
    exc = rejects(data, tiny_registry, "no-such-model")
    assert "not available" in str(exc)


@pytest.mark.parametrize("ident, keyword", [
    (b"Tiny", "invalid model id"),  # upper case is outside the id alphabet
    (b"-tiny", "invalid model id"),
    (b"tiny test", "invalid model id"),
    (b"\xfftiny", "not ASCII"),
])
def test_malformed_model_id(stream, tiny_registry, ident, keyword):
    rejects(raw_stream([(b"ZLAT", b""), (b"YLAT", b"")], model_id=ident), tiny_registry,
            keyword)


@pytest.mark.parametrize("id_len", [0, 65, 255])
def test_bad_model_id_length(tiny_registry, id_len):
    rejects(raw_stream([(b"ZLAT", b""), (b"YLAT", b"")], id_len=id_len), tiny_registry,
            "invalid model id length")


def test_model_id_longer_than_the_stream(tiny_registry):
    # id_len 60 is legal but runs past the end of the data.
    rejects(raw_stream(model_id=b"tiny", id_len=60), tiny_registry, "invalid model id length")


@pytest.mark.parametrize("width, height", [
    (2**31 - 1, 2**31 - 1), (2**32 - 1, 2**32 - 1), (2**32 - 1, 1), (1 << 14, (1 << 14) + 1),
])
def test_absurd_size(tiny_registry, width, height):
    data = raw_stream([(b"ZLAT", b""), (b"YLAT", b"")], width=width, height=height)
    rejects(data, tiny_registry, "exceeds the limit")
    with pytest.raises(BitstreamError, match="exceeds the limit"):
        parse(data)  # refused by the format limit itself, whatever the decoder allows


@pytest.mark.parametrize("width, height", [(0, 40), (56, 0), (0, 0)])
def test_empty_size(tiny_registry, width, height):
    data = raw_stream([(b"ZLAT", b""), (b"YLAT", b"")], width=width, height=height)
    rejects(data, tiny_registry, "invalid image size")


def test_size_within_format_but_above_max_pixels(stream, tiny_registry):
    rejects(stream, tiny_registry, "exceeds the limit", max_pixels=WIDTH * HEIGHT - 1)
    big = raw_stream([(b"ZLAT", b""), (b"YLAT", b"")], width=1 << 14, height=1 << 14)
    assert FORMAT_MAX_PIXELS == 1 << 28
    exc = rejects(big, tiny_registry, "exceeds the limit", max_pixels=FUZZ_MAX_PIXELS)
    assert str(FUZZ_MAX_PIXELS) in str(exc)


@pytest.mark.parametrize("field, value, keyword", [
    ("color", 2, "unknown color mode"),
    ("pad", 3, "unknown padding mode"),
    ("orientation", 0, "invalid orientation"),
    ("orientation", 9, "invalid orientation"),
    ("depth", 12, "invalid source bit depth"),
])
def test_bad_header_field(tiny_registry, field, value, keyword):
    data = raw_stream([(b"ZLAT", b""), (b"YLAT", b"")], **{field: value})
    rejects(data, tiny_registry, keyword)


# ----------------------------------------------------------------------------- sections


def test_section_longer_than_the_data(stream, tiny_registry):
    bs = parse(stream)
    z, y = bs.sections["ZLAT"], bs.sections["YLAT"]
    rejects(raw_stream([(b"ZLAT", z), (b"YLAT", y, len(y) + 1)]), tiny_registry, "claims")
    rejects(raw_stream([(b"ZLAT", z, 2**32 - 1), (b"YLAT", y)]), tiny_registry, "claims")


def test_truncated_section_header(stream, tiny_registry):
    good = raw_stream([(b"ZLAT", b""), (b"YLAT", b"")])
    rejects(with_crc(good[:-4] + b"ALP"), tiny_registry, "truncated section header")


def test_duplicated_section(stream, tiny_registry):
    bs = parse(stream)
    z, y = bs.sections["ZLAT"], bs.sections["YLAT"]
    rejects(raw_stream([(b"ZLAT", z), (b"ZLAT", z), (b"YLAT", y)]), tiny_registry, "repeated")
    rejects(raw_stream([(b"ZLAT", z), (b"YLAT", y), (b"YLAT", y)]), tiny_registry, "repeated")


def test_sections_out_of_order(stream, tiny_registry):
    bs = parse(stream)
    z, y = bs.sections["ZLAT"], bs.sections["YLAT"]
    rejects(raw_stream([(b"YLAT", y), (b"ZLAT", z)]), tiny_registry, "out of order")
    alph = pack_alpha(bytes(WIDTH * HEIGHT))
    rejects(raw_stream([(b"ZLAT", z), (b"ALPH", alph), (b"YLAT", y)]), tiny_registry,
            "out of order")
    meta = bs.sections["META"]
    rejects(raw_stream([(b"ZLAT", z), (b"YLAT", y), (b"META", meta), (b"ALPH", alph)]),
            tiny_registry, "out of order")
    rejects(raw_stream([(b"ZLAT", z), (b"META", meta), (b"YLAT", y)]), tiny_registry,
            "out of order")


@pytest.mark.parametrize("tag", [b"XTRA", b"zlat", b"\x00\x00\x00\x00", b"\xff\xfeAB"])
def test_unknown_section_tag(stream, tiny_registry, tag):
    bs = parse(stream)
    z, y = bs.sections["ZLAT"], bs.sections["YLAT"]
    rejects(raw_stream([(b"ZLAT", z), (tag, b"abcd"), (b"YLAT", y)]), tiny_registry,
            "unknown section")
    rejects(raw_stream([(b"ZLAT", z), (b"YLAT", y), (tag, b"")]), tiny_registry,
            "unknown section")


@pytest.mark.parametrize("remove, missing", [
    (("YLAT",), "YLAT"), (("ZLAT",), "ZLAT"), (("ZLAT", "YLAT"), "ZLAT, YLAT"),
])
def test_missing_section(stream, tiny_registry, remove, missing):
    exc = rejects(repack(stream, **dict.fromkeys(remove)), tiny_registry, "missing section")
    assert missing in str(exc)


@pytest.mark.parametrize("tag", ["ZLAT", "YLAT"])
@pytest.mark.parametrize("extra", [1, 2, 3])
def test_latent_length_not_a_multiple_of_4(stream, tiny_registry, tag, extra):
    payload = parse(stream).sections[tag] + b"\x01" * extra
    exc = rejects(repack(stream, **{tag: payload}), tiny_registry, "invalid length")
    assert tag in str(exc)


@pytest.mark.parametrize("tag", ["ZLAT", "YLAT"])
def test_latent_section_too_long(stream, tiny_registry, tag):
    n = dict(zip(("ZLAT", "YLAT"), symbol_counts(tiny_registry, stream),
                 strict=True))[tag]
    words = coding.max_stream_words(n) + 1
    payload = random_words(np.random.default_rng(0), words)
    exc = rejects(repack(stream, **{tag: payload}), tiny_registry, "invalid length")
    assert str(n) in str(exc)


@pytest.mark.parametrize("tag", ["ZLAT", "YLAT"])
def test_garbage_latent_payload(stream, tiny_registry, tag):
    """Random payloads with a valid CRC: BitstreamError, or (rarely) a correctly sized image.

    ANS payloads are not self-checking: a short word sequence is often the exact encoding of
    *some* symbols, so garbage can decode. What can be demanded is no other exception, no
    hang, and refusal where the data cannot be a valid stream.
    """
    n = dict(zip(("ZLAT", "YLAT"), symbol_counts(tiny_registry, stream),
                 strict=True))[tag]
    bound = coding.max_stream_words(n)
    rng = np.random.default_rng(2)
    # At the word bound there are always words left over: a symbol consumes at most 40 bits
    # (24-bit table + 16-bit escape), and the coder state at most 2 words.
    for words in (bound, bound - 1):
        for _ in range(5):
            payload = random_words(rng, words)
            rejects(repack(stream, **{tag: payload}), tiny_registry, "corrupt latent stream")
    # Ending in a zero word is never a valid ANS stream.
    rejects(repack(stream, **{tag: bytes(8)}), tiny_registry, "corrupt latent stream")
    for words in (1, 2, 3, 5, 8, 16, bound // 2):
        for _ in range(4):
            data = repack(stream, **{tag: random_words(rng, words)})
            t0 = time.perf_counter()
            try:
                decoded = decode(data, registry=tiny_registry)
            except BitstreamError as exc:
                assert "corrupt latent stream" in str(exc), exc
            else:
                assert decoded.rgb.shape == (HEIGHT, WIDTH, 3)
            assert time.perf_counter() - t0 < 5


def test_corrupt_alpha(stream, tiny_registry, alpha_plane):
    plane = alpha_plane.tobytes()
    good = pack_alpha(plane)
    for payload in [
        b"",
        b"not zlib at all",
        good[: len(good) // 2],  # truncated deflate stream
        good[:-4] + bytes(4),  # bad adler32
        pack_alpha(plane[:-1]),  # one byte short
        pack_alpha(plane + b"\x00"),  # one byte long
        pack_alpha(bytes(10 * len(plane))),  # a small zlib bomb
        zlib.compress(plane, 9, wbits=-15),  # raw deflate, no zlib header
    ]:
        rejects(repack(stream, ALPH=payload), tiny_registry, "corrupt alpha section")


def test_alpha_with_trailing_bytes(stream, tiny_registry, alpha_plane):
    payload = pack_alpha(alpha_plane.tobytes()) + b"trailing junk"
    rejects(repack(stream, ALPH=payload), tiny_registry, "corrupt alpha section")


def test_model_id_is_not_a_quality_level(stream, tiny_registry):
    rejects(repack(stream, Header("1", WIDTH, HEIGHT)), tiny_registry, "not available")


def test_decode_work_bounded_by_max_pixels(tiny_registry, monkeypatch):
    seen = []
    original = api._synthesize

    def spy(lm, y_hat, height, width, device):
        seen.append(256 * y_hat.shape[-2] * y_hat.shape[-1])  # padded pixels synthesized
        return original(lm, y_hat, height, width, device)

    monkeypatch.setattr(api, "_synthesize", spy)
    data = pack(Bitstream(Header(TINY_ID, FUZZ_MAX_PIXELS, 1), {"ZLAT": b"", "YLAT": b""}))
    try:
        decode(data, max_pixels=FUZZ_MAX_PIXELS, registry=tiny_registry)
    except BitstreamError:
        return
    # A bound that every image within the limit meets when it is not extremely elongated.
    assert seen[0] <= 16 * FUZZ_MAX_PIXELS, seen


def resized(data: bytes, width: int, height: int) -> bytes:
    """A real stream with another image size written into its header, CRC recomputed."""
    bs = parse(data)
    bs.header = dataclasses.replace(bs.header, width=width, height=height)
    return pack(bs)


def bounded_decode(data: bytes, registry, **kwargs):
    """decode(data) -> (DecodedImage or BitstreamError, seconds, peak traced bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = decode(data, registry=registry, **kwargs)
    except BitstreamError as exc:
        result = exc
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, seconds, peak


@pytest.mark.parametrize("width, height, keyword", [
    (9990, 9990, "stream too short for the declared image"),
    (1 << 14, 1 << 14, "stream too short for the declared image"),
    (FORMAT_MAX_PIXELS >> 6, 64, "stream too short for the declared image"),
    (1000, 1000, "corrupt latent stream"),  # within what 16 bytes of ZLAT may hold
    (128, 64, "corrupt latent stream"),  # the data runs out
])
@pytest.mark.parametrize("which", ["fixed", "variable"])
def test_forged_image_size_is_refused(stream, vr_stream, tiny_vr_registry, width, height,
                                      keyword, which):
    """The decode bomb: a real 56x40 stream whose header claims a far larger image."""
    data = resized(stream if which == "fixed" else vr_stream, width, height)
    result, seconds, peak = bounded_decode(data, tiny_vr_registry,
                                           max_pixels=FORMAT_MAX_PIXELS)
    assert isinstance(result, BitstreamError) and keyword in str(result), result
    assert seconds < DECODE_SECONDS and peak < DECODE_TRACED_BYTES, (seconds, peak)


def test_work_bound_keeps_real_streams(stream, vr_stream, tiny_vr_registry):
    # other sizes with the same latent grids (56x40 codes 4x3 y, 1x1 z: "tight" layout)
    for data in (stream, vr_stream, resized(stream, 64, 48), resized(vr_stream, 50, 33)):
        result, _, _ = bounded_decode(data, tiny_vr_registry)
        h = parse(data).header
        assert not isinstance(result, BitstreamError), result
        assert result.rgb.shape == (h.height, h.width, 3)


# ----------------------------------------------------------------------------- fuzzing


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_parse_arbitrary_bytes(data):
    try:
        bs = parse(data)
    except BitstreamError:
        return
    assert pack(bs) == data  # anything accepted is canonical


@FUZZ
@given(prefix=st.sampled_from([b"", MAGIC, MAGIC + bytes([FORMAT_VERSION])]),
       rest=st.binary(max_size=256))
def test_fuzz_parse_checksummed_bytes(prefix, rest):
    """Past magic, version and CRC, so the header and section checks are what is exercised."""
    data = with_crc(prefix + rest)
    try:
        bs = parse(data, max_pixels=FUZZ_MAX_PIXELS)
    except BitstreamError:
        return
    assert bs.header.width * bs.header.height <= FUZZ_MAX_PIXELS
    assert pack(bs) == data


_EDITS = st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 1 << 16),
              st.integers(0, 255)),
    min_size=1, max_size=6)


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for op, pos, value in edits:
        if op == "insert":
            out.insert(pos % (len(out) + 1), value)
        elif out:
            if op == "set":
                out[pos % len(out)] = value
            else:
                del out[pos % len(out)]
    return bytes(out)


# Where the edits go, and whether the CRC is recomputed afterwards (so that the header and
# section checks and the entropy decoder are reached rather than the checksum).
_HEADER_END = 5 + 13 + len(TINY_ID)  # magic, version, fixed fields, model id
_MODES = {
    "raw": (0, None, False),  # anywhere, CRC left as it is
    "crc-fixed": (0, None, True),  # anywhere
    "fields": (5, 18, True),  # width .. model_id_len
    "sections": (_HEADER_END, None, True),  # section headers and payloads
}


@pytest.mark.parametrize("mode", list(_MODES))
@FUZZ
@given(edits=_EDITS)
def test_fuzz_decode_mutations(stream, tiny_registry, mode, edits):
    start, stop, fix_crc = _MODES[mode]
    body, crc = stream[:-4], stream[-4:]
    stop = len(body) if stop is None else stop
    data = body[:start] + _mutate(body[start:stop], edits) + body[stop:]
    data = with_crc(data) if fix_crc else data + crc
    t0 = time.perf_counter()
    try:
        decoded = decode(data, max_pixels=FUZZ_MAX_PIXELS, registry=tiny_registry)
    except BitstreamError as exc:
        event(re.sub(r"[\d']\S*", "#", str(exc))[:40])  # which check fired (statistics)
    else:
        event("decoded")
        h = parse(data).header
        assert h.width * h.height <= FUZZ_MAX_PIXELS
        assert decoded.rgb.shape == (h.height, h.width, 3)
        assert decoded.alpha is None or decoded.alpha.shape == (h.height, h.width)
    assert time.perf_counter() - t0 < 5


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_fuzz_decode_payload_overwrites(stream, tiny_registry, edits):
    """Byte overwrites inside the ZLAT / YLAT payloads only: the entropy decoder's turn."""
    bs = parse(stream)
    z, y = bytearray(bs.sections["ZLAT"]), bytearray(bs.sections["YLAT"])
    for pos, value in edits:
        target = z if pos % 2 == 0 or not y else y
        target[(pos // 2) % len(target)] = value
    data = repack(stream, ZLAT=bytes(z), YLAT=bytes(y))
    t0 = time.perf_counter()
    try:
        decoded = decode(data, max_pixels=FUZZ_MAX_PIXELS, registry=tiny_registry)
    except BitstreamError as exc:
        event(re.sub(r"[\d']\S*", "#", str(exc))[:40])
    else:
        event("decoded")
        assert decoded.rgb.shape == (HEIGHT, WIDTH, 3)
    assert time.perf_counter() - t0 < 5


def forged(model_id: str, version: int, rate: int | None, width: int, height: int,
           sections: list[tuple[bytes, bytes]], color: int = 0, orientation: int = 1,
           depth: int = 8) -> bytes:
    """A stream written field by field, any version / model / rate combination, valid CRC."""
    ident = model_id.encode()
    body = struct.pack(">4sB", MAGIC, version)
    body += struct.pack(">IIBBBBB", width, height, color, orientation, depth, 0, len(ident))
    body += ident + (b"" if rate is None else struct.pack(">H", rate))
    for tag, payload in sections:
        body += struct.pack(">4sI", tag, len(payload)) + payload
    return with_crc(body)


_DIMENSION = st.one_of(st.integers(1, 200), st.integers(1, 1 << 16),
                       st.sampled_from([9990, 1 << 14, (1 << 16) - 1]))
# A latent payload: the real one (of either model), a prefix or suffix of it, random words,
# random bytes (often not a whole number of words), or nothing.
_PAYLOAD = st.one_of(
    st.tuples(st.sampled_from(["real", "prefix", "suffix"]), st.integers(0, 64)),
    st.lists(st.integers(0, (1 << 32) - 1), max_size=48).map(
        lambda w: np.array(w, ">u4").tobytes()),
    st.binary(max_size=64),
)


def _payload(choice, real: bytes) -> bytes:
    if isinstance(choice, bytes):
        return choice
    kind, n = choice
    return {"real": real, "prefix": real[:n], "suffix": real[n:]}[kind]


_RARELY = st.integers(0, 9).map(lambda i: i == 0)
_decode_groups = coding._decode_groups


def _decode_groups_within_capacity(words, counts, offsets, sizes, models, costs):
    """The entropy decoder is never asked for more symbols than the words can hold."""
    assert coding.min_stream_bits(counts, costs) <= 32 * len(words), (counts, len(words))
    return _decode_groups(words, counts, offsets, sizes, models, costs)


@FUZZ_HEADERS
@given(model=st.sampled_from([TINY_ID, TINY_VR_ID]), wrong_version=_RARELY,
       rate=st.one_of(st.sampled_from([0, 32, 64]), st.integers(65, 0xFFFF)),
       no_rate_field=_RARELY, width=_DIMENSION, height=_DIMENSION,
       z=_PAYLOAD, y=_PAYLOAD, source=st.sampled_from(["fixed", "variable"]),
       extra=st.sampled_from([None, None, None, "ALPH", "META"]),
       extra_payload=st.binary(max_size=32))
def test_fuzz_forged_headers(stream, vr_stream, tiny_vr_registry, model, wrong_version, rate,
                             no_rate_field, width, height, z, y, source, extra, extra_payload):
    """Forged headers (any size up to the format limit, version, model, rate field) over
    real, cut or random sections, CRC recomputed: a clean BitstreamError or a correctly
    sized image, within a time and memory bound that does not grow with the declared size."""
    real = parse(stream if source == "fixed" else vr_stream).sections
    sections = [(b"ZLAT", _payload(z, real["ZLAT"])), (b"YLAT", _payload(y, real["YLAT"]))]
    if extra == "ALPH":
        sections.append((b"ALPH", pack_alpha(extra_payload * (width * height % 7 + 1))))
    elif extra == "META":
        sections.append((b"META", extra_payload or real["META"]))
    version = (1 if model == TINY_ID else 2) if not wrong_version else (2 if model == TINY_ID
                                                                          else 1)
    field = None if version == 1 or no_rate_field else rate
    data = forged(model, version, field, width, height, sections)
    with mock.patch.object(coding, "_decode_groups", _decode_groups_within_capacity):
        result, seconds, peak = bounded_decode(data, tiny_vr_registry,
                                               max_pixels=FORMAT_MAX_PIXELS)
    if isinstance(result, BitstreamError):
        event(re.sub(r"[\d']\S*", "#", str(result))[:48])
    else:
        event("decoded")
        h = parse(data).header
        assert result.rgb.shape == (h.height, h.width, 3)
        assert (h.rate is None) == (model == TINY_ID) and h.rate in (None, 0, 32, 64)
    assert seconds < DECODE_SECONDS, seconds
    assert peak < DECODE_TRACED_BYTES, peak
