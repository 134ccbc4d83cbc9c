"""End to end through the public API: encode, verify, decode, account for every bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from codec.api import Codec, decode
from codec.bitstream import parse
from codec.images import load_image
from codec.inference import InferenceConfig
from tests.conftest import smooth_image

AMORTIZED = InferenceConfig(method="amortized")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def codec(tiny_registry):
    return Codec(registry=tiny_registry, device="cpu")


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (63, 65), (64, 64), (100, 37)])
def test_any_size_round_trips(codec, tiny_registry, size):
    h, w = size
    result = codec.encode(load_image(_png(smooth_image(h, w))), AMORTIZED)
    decoded = decode(result.data, registry=tiny_registry)
    assert decoded.rgb.shape == (h, w, 3) and decoded.rgb.dtype == np.uint8
    assert (result.width, result.height) == (w, h)


def test_rate_accounting(codec, tiny_registry):
    result = codec.encode(load_image(_png(smooth_image(96, 160))), AMORTIZED)
    bs = parse(result.data)
    assert result.bits == 8 * len(result.data)
    assert result.bpp == pytest.approx(8 * len(result.data) / (96 * 160))
    assert result.payload_bits == 8 * (len(bs.sections["ZLAT"]) + len(bs.sections["YLAT"]))
    assert result.payload_bits < result.bits
    assert result.estimated_bits > 0
    # the PSNR reported is that of what a decoder gives back
    decoded = decode(result.data, registry=tiny_registry)
    source = smooth_image(96, 160).astype(np.float64)
    mse = np.mean((decoded.rgb - source) ** 2)
    assert result.psnr == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-6)


def test_decoding_is_deterministic_across_runs_and_threads(codec, tiny_registry):
    data = codec.encode(load_image(_png(smooth_image(130, 200, seed=4))), AMORTIZED).data
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode(data, registry=tiny_registry).rgb
        again = decode(data, registry=tiny_registry).rgb
        torch.set_num_threads(2)
        two = decode(data, registry=tiny_registry).rgb
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one, again) and np.array_equal(one, two)


def test_encoding_is_deterministic(codec):
    image = load_image(_png(smooth_image(64, 64, seed=5)))
    cfg = InferenceConfig(method="sga", iterations=5)
    assert codec.encode(image, cfg).data == codec.encode(image, cfg).data


def test_grayscale_stays_grayscale(codec, tiny_registry):
    gray = smooth_image(40, 50)[..., 0]
    result = codec.encode(load_image(_png(gray, "L")), AMORTIZED)
    decoded = decode(result.data, registry=tiny_registry)
    assert decoded.header.color == "L" and decoded.to_pil().mode == "L"


def test_alpha_is_kept_losslessly(codec, tiny_registry):
    rgba = np.dstack([smooth_image(33, 47), np.arange(33 * 47, dtype=np.uint8).reshape(33, 47)])
    result = codec.encode(load_image(_png(rgba, "RGBA")), AMORTIZED)
    decoded = decode(result.data, registry=tiny_registry)
    assert np.array_equal(decoded.alpha, rgba[..., 3])
    assert decoded.to_pil().mode == "RGBA"


def test_batch_encoding_groups_sizes_and_keeps_order(codec, tiny_registry):
    sizes = [(64, 64), (40, 100), (60, 60), (64, 128)]
    images = [load_image(_png(smooth_image(h, w, seed=i))) for i, (h, w) in enumerate(sizes)]
    results = codec.encode_batch(images, InferenceConfig(method="sga", iterations=3))
    assert [(r.height, r.width) for r in results] == sizes
    for r, (h, w) in zip(results, sizes, strict=True):
        assert decode(r.data, registry=tiny_registry).rgb.shape == (h, w, 3)
