"""Lossy bits-back coding (codec.bits_back): image and side information round trips."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec import bits_back as bb
from codec.api import decode as api_decode
from codec.bitstream import parse
from codec.errors import BitstreamError, ModelError
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.model import MeanScaleHyperprior
from codec.registry import load as load_msh
from tests.conftest import smooth_image

BB_ID = "tiny-bb-test"
FEW = InferenceConfig(iterations=4)


@pytest.fixture(scope="module")
def bb_registry(tmp_path_factory, one_thread) -> Path:
    torch.manual_seed(0)
    registry = tmp_path_factory.mktemp("bb-weights") / "registry.json"
    bb.export(bb.from_msh(MeanScaleHyperprior(N=16, M=24)), BB_ID, 0.01, 0, "untrained",
              registry=registry)
    return registry


@pytest.fixture(scope="module")
def image():
    buf = io.BytesIO()
    Image.fromarray(smooth_image(70, 100, seed=3)).save(buf, "PNG")
    return load_image(buf.getvalue())


def _encode(image, xi, registry, method="bb-no-sga", steps=6):
    return bb.encode(image, xi, BB_ID, method, FEW, bbvi_steps=steps, registry=registry)


@pytest.mark.parametrize("length", [0, 1, 37, 1000])
def test_side_information_round_trips(bb_registry, image, length):
    xi = np.random.default_rng(length).bytes(length)
    result = _encode(image, xi, bb_registry)
    rgb, alpha, back = bb.decode(result.data, side_info=True, registry=bb_registry)
    assert back == xi
    assert alpha is None and rgb.shape == (70, 100, 3)
    assert result.side_info_bits == 8 * length
    assert result.net_bpp == pytest.approx((result.bits - 8 * length) / (70 * 100))


@pytest.mark.parametrize("method", bb.METHODS)
def test_every_method_round_trips(bb_registry, image, method):
    """[M2] sga-bb, [A5] bb-no-sga, [A6] bb-amortized."""
    xi = b"a caption: the harbour at dawn"
    result = _encode(image, xi, bb_registry, method)
    assert result.iterations == (FEW.iterations if method == "sga-bb" else 0)
    assert result.bbvi_steps == (0 if method == "bb-amortized" else 6)
    assert parse(result.data).header.version == 4
    assert bb.decode(result.data, side_info=True, registry=bb_registry)[2] == xi


def test_side_information_is_got_back(bb_registry, image):
    """Side information up to what z_hat's choice carries costs the file (almost) nothing:
    without any, random filler takes its place."""
    empty = _encode(image, b"", bb_registry)
    assert empty.capacity_bits > 100
    rng = np.random.default_rng(0)  # seeded: os.urandom made the bounds below flaky
    xi = rng.bytes(empty.capacity_bits // 8 - 8)
    carried = _encode(image, xi, bb_registry)
    assert abs(carried.bits - empty.bits) <= 64  # within a few words
    assert carried.net_bpp < empty.net_bpp
    more = _encode(image, xi + rng.bytes(400), bb_registry)
    # beyond capacity it is stored: the 400 bytes less the 8 that `carried` left spare,
    # within four 32-bit words (over 12 seeds: 3200 - 96 ... 3200 - 192 bits)
    assert more.bits >= carried.bits + 8 * (400 - 8) - 4 * 32


def test_plain_decode_runs_no_bbvi(bb_registry, image, monkeypatch):
    data = _encode(image, b"secret", bb_registry).data
    with_xi = bb.decode(data, side_info=True, registry=bb_registry)[0]

    def refuse(*args, **kwargs):
        raise AssertionError("BBVI ran for a plain decode")

    monkeypatch.setattr(bb, "reproducible_bbvi", refuse)
    rgb, _, xi = bb.decode(data, registry=bb_registry)
    assert xi is None and np.array_equal(rgb, with_xi)
    assert np.array_equal(api_decode(data, registry=bb_registry).rgb, rgb)


def _with_digest(data: bytes, digest: int) -> bytes:
    """The stream with another Q digest in its header (and the CRC recomputed)."""
    body = bytearray(data[:-4])
    at = 18 + body[17] + 4  # after the id and the BBVI steps
    body[at:at + 4] = struct.pack(">I", digest)
    return bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)))


def test_unrecoverable_side_information_says_so(bb_registry, image):
    data = _encode(image, b"side information", bb_registry).data
    forged = _with_digest(data, parse(data).header.q_digest ^ 1)
    with pytest.raises(bb.SideInfoError, match="cannot be recovered on this machine"):
        bb.decode(forged, side_info=True, registry=bb_registry)
    rgb, _, _ = bb.decode(forged, registry=bb_registry)  # the image decodes regardless
    assert np.array_equal(rgb, bb.decode(data, registry=bb_registry)[0])


def test_other_bbvi_steps_do_not_recover(bb_registry, image):
    """Recovery needs the encoder's exact Q: a stream claiming other steps is refused."""
    data = _encode(image, b"x" * 40, bb_registry).data
    h = parse(data).header
    body = bytearray(data[:-4])
    at = 18 + body[17]
    body[at:at + 4] = struct.pack(">I", h.bbvi_steps + 1)
    forged = bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)))
    with pytest.raises(bb.SideInfoError):
        bb.decode(forged, side_info=True, registry=bb_registry)


def test_bbvi_does_not_depend_on_the_callers_thread_count(bb_registry, image):
    lm = bb.load(BB_ID, bb_registry)
    y = np.random.default_rng(0).integers(-3, 4, (24, 8, 12))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = bb.reproducible_bbvi(lm, y, 20)
        torch.set_num_threads(1)
        one = bb.reproducible_bbvi(lm, y, 20)
    finally:
        torch.set_num_threads(saved)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert bb.reproducible_bbvi(lm, y, 20)[0].dtype == np.int64


def test_corrupt_latents_are_a_clear_error(bb_registry, image):
    data = _encode(image, b"", bb_registry).data
    bs = parse(data)
    cut = bytearray(data[:-4])
    z_len = len(bs.sections["ZLAT"])
    at = data.index(b"ZLAT") + 4
    cut[at:at + 4] = struct.pack(">I", z_len - 8)
    del cut[at + 4 + z_len - 8:at + 4 + z_len]
    forged = bytes(cut) + struct.pack(">I", zlib.crc32(bytes(cut)))
    with pytest.raises(BitstreamError):
        bb.decode(forged, side_info=True, registry=bb_registry)


def test_a_bits_back_model_is_refused_by_the_other_methods(bb_registry):
    with pytest.raises(ModelError, match="--method sga-bb"):
        load_msh(BB_ID, bb_registry)
    with pytest.raises(ModelError, match="unknown model"):
        bb.load("nonexistent", bb_registry)


def test_oversized_side_information_is_refused(bb_registry, image):
    with pytest.raises(ValueError, match="at most"):
        _encode(image, bytes(bb.MAX_SIDE_INFO + 1), bb_registry)


def test_sgarc_train_bits_back_exports_a_working_model(tmp_path, image):
    from codec.registry import find
    from jobs.train import main

    data = tmp_path / "train"
    data.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(80, 80, seed=i)).save(data / f"{i}.png")
    registry = tmp_path / "weights" / "registry.json"
    assert main(["--bits-back", "--data", str(data), "--checkpoint", str(tmp_path / "bb.pt"),
                 "--steps", "2", "--batch-size", "2", "--crop", "64", "--export", "bb-cli",
                 "--registry", str(registry)]) == 0
    assert find("bb-cli", registry).bits_back == bb.Z_GRID_BITS
    result = bb.encode(image, b"hello", "bb-cli", "bb-amortized", registry=registry)
    assert bb.decode(result.data, side_info=True, registry=registry)[2] == b"hello"


def test_cli_carries_side_information(tmp_path, capsys):
    """sgarc encode --method sga-bb --side-info, sgarc decode --side-info-out (shipped model)."""
    from jobs.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(smooth_image(64, 96, seed=5)).save(src)
    side = tmp_path / "caption.txt"
    side.write_bytes("Hafen bei Sonnenaufgang, 1962 \N{CAMERA}".encode())
    out, back, png = tmp_path / "x.sga", tmp_path / "back.txt", tmp_path / "x.png"
    assert main(["encode", str(src), str(out), "--method", "sga-bb", "--side-info", str(side),
                 "--iterations", "2", "--bbvi-steps", "3"]) == 0
    assert "got back" in capsys.readouterr().out
    assert main(["decode", str(out), str(png), "--side-info-out", str(back)]) == 0
    assert back.read_bytes() == side.read_bytes()
    assert main(["decode", str(out), str(tmp_path / "plain.png")]) == 0
    assert not (tmp_path / "plain.txt").exists()
    assert main(["encode", str(src), str(out), "--method", "sga-bb", "--quality", "2"]) == 2
    assert main(["decode", str(out), str(png), "--side-info-out", str(back)]) == 0
    plain = tmp_path / "plain.sga"
    assert main(["encode", str(src), str(plain), "-m", "amortized"]) == 0
    assert main(["decode", str(plain), str(png), "--side-info-out", str(back)]) == 2
    assert "carries no side information" in capsys.readouterr().err
