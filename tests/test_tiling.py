"""Tiled g_a / g_s (codec.tiling) give the whole-image result: values, gradients, streams.

Tiles are forced small so that every test crosses many tile edges and all four borders,
on sizes that are not multiples of the tile, with a batch of two.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from codec import tiling
from codec.api import Codec, decode
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.model import MeanScaleHyperprior
from tests.conftest import smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MeanScaleHyperprior:
    torch.manual_seed(0)
    return MeanScaleHyperprior(N=16, M=24).eval()


def _latents(model: MeanScaleHyperprior, h: int = 11, w: int = 13) -> torch.Tensor:
    return 3.0 * torch.randn(2, model.M, h, w, generator=torch.Generator().manual_seed(1))


def test_halo_is_the_receptive_field(model):
    """g_s reads 1 latent before a core and 2 after; g_a 30 pixels before: halos 2 and 2."""
    assert tiling.strides(model.g_s) == (1, 16) and tiling.strides(model.g_a) == (16, 1)
    assert tiling.input_span(model.g_s, 16 * 5, 16 * 9 - 1) == (4, 10)  # latents [5, 9)
    assert tiling.input_span(model.g_a, 5, 8) == (16 * 5 - 30, 16 * 9 + 14)
    assert tiling.halo_blocks(model.g_s) == 2 and tiling.halo_blocks(model.g_a) == 2


def test_synthesis_tiled_equals_whole(model):
    y = _latents(model)
    with torch.no_grad():
        whole = model.g_s(y)
    for tile in (2, 3, 5):
        tiled = tiling.synthesize_tiled(model.g_s, y, tile=tile)
        assert tiled.shape == whole.shape
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    # a halo short of the receptive field is not exact: the halo is what makes it so
    assert (tiling.synthesize_tiled(model.g_s, y, tile=3, halo=1) - whole).abs().max() > 1e-3


def test_analysis_tiled_equals_whole(model):
    x = torch.rand(2, 3, 16 * 9, 16 * 13, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model.g_a(x)
    for tile in (32, 48, 64):
        tiled = tiling.analyze_tiled(model.g_a, x, tile=tile)
        assert tiled.shape == whole.shape
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    assert (tiling.analyze_tiled(model.g_a, x, tile=48, halo=16) - whole).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiples of 16"):
        tiling.analyze_tiled(model.g_a, x, tile=40)


def test_pixels_tiled_equal_whole(model):
    y = _latents(model, 7, 9)
    whole = tiling.synthesize_pixels(model.g_s, y, 101, 139)  # under the threshold: one pass
    tiled = tiling.synthesize_pixels(model.g_s, y, 101, 139, tile=2)
    assert tiled.shape == whole.shape == (2, 101, 139, 3) and tiled.dtype == np.uint8
    assert np.abs(tiled.astype(int) - whole).max() <= 1


@pytest.mark.parametrize("clamp", [False, True])
def test_masked_sse_value_and_gradient(model, clamp):
    y = _latents(model, 6, 7).mul_(0.3)
    x = torch.rand(2, 3, 96, 112, generator=torch.Generator().manual_seed(3))
    sizes = [(90, 100), (96, 57)]  # original sizes: padding is masked out
    mask = torch.zeros(2, 1, 96, 112)
    mask[0, :, :90, :100] = 1.0
    mask[1, :, :96, :57] = 1.0

    def value_and_grad(fn):
        yy = y.clone().requires_grad_(True)
        sse = fn(yy)
        (sse * torch.tensor([1.0, 0.5])).sum().backward()
        return sse.detach(), yy.grad

    def whole(yy):
        x_hat = model.g_s(yy)
        if clamp:
            x_hat = x_hat.clamp(0.0, 1.0)
        return (((x_hat - x) ** 2) * mask).sum(dim=(1, 2, 3))

    v0, g0 = value_and_grad(whole)
    v1, g1 = value_and_grad(lambda yy: tiling.masked_sse_tiled(model.g_s, yy, x, sizes, tile=2,
                                                               clamp=clamp))
    assert v1.shape == (2,)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
    assert g0.abs().max() > 0
    with torch.no_grad():  # the hard evaluation runs without autograd
        torch.testing.assert_close(tiling.masked_sse_tiled(model.g_s, y, x, sizes, tile=3,
                                                           clamp=clamp), v0)


def test_masked_sse_keeps_only_tile_inputs_for_backward(model):
    """Checkpointing: what autograd saves is the inputs (views), not g_s's activations."""
    y = torch.randn(1, model.M, 16, 16, requires_grad=True)
    x = torch.rand(1, 3, 256, 256)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def saved_bytes(fn) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += nbytes(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total

    tiled = saved_bytes(lambda: tiling.masked_sse_tiled(model.g_s, y, x, [(256, 256)], tile=4))
    whole = saved_bytes(lambda: ((model.g_s(y) - x) ** 2).sum(dim=(1, 2, 3)))
    # x once (the masks are made per tile), y's windows overlapping by their halos
    assert tiled <= nbytes(x) + 4 * nbytes(y) < whole / 5


def test_helpers_tile_only_large_images(model, monkeypatch):
    """analysis / synthesis / masked_sse: one pass below MIN_TILED_PIXELS, tiles above it."""
    y = _latents(model, 5, 6)
    x = torch.rand(2, 3, 80, 96)
    sizes = [(80, 96), (80, 96)]

    def run() -> tuple[list[torch.Tensor], dict[str, int]]:
        """The three helpers' results, and how many passes of g_a and g_s they took."""
        calls = {"g_a": 0, "g_s": 0}
        hooks = [getattr(model, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
        try:
            with torch.no_grad():
                return [tiling.analysis(model, x), tiling.synthesis(model, y),
                        tiling.masked_sse(model.g_s, y, x, sizes)], calls
        finally:
            for hook in hooks:
                hook.remove()

    whole, calls = run()
    assert calls == {"g_a": 1, "g_s": 2}
    monkeypatch.setattr(tiling, "MIN_TILED_PIXELS", 80 * 96 - 1)  # each image is large now
    monkeypatch.setattr(tiling, "SYNTHESIS_TILE", 3)
    monkeypatch.setattr(tiling, "ANALYSIS_TILE", 48)
    tiled, calls = run()
    assert calls == {"g_a": 2 * 2, "g_s": 2 * 2 * 2}  # 2x2 tiles each
    for t, w in zip(tiled, whole, strict=True):
        torch.testing.assert_close(t, w, rtol=1e-5, atol=1e-5)


def test_8bit_input_is_converted_per_tile_to_the_same_values(model):
    """g_a and the distortion take the image as 8 bits and convert each tile's window:
    bit-for-bit what converting the whole image to float first gives."""
    rng = np.random.default_rng(4)
    rgb = torch.from_numpy(rng.integers(0, 256, (2, 96, 112, 3), dtype=np.uint8))
    x8 = rgb.permute(0, 3, 1, 2)  # how the encoder hands images over (channels last)
    x = x8.float().div_(255.0)
    y = _latents(model, 6, 7).mul_(0.3)
    sizes = [(90, 100), (96, 57)]
    with torch.no_grad():
        assert torch.equal(tiling.analyze_tiled(model.g_a, x8, tile=32),
                           tiling.analyze_tiled(model.g_a, x, tile=32))
        assert torch.equal(tiling.analysis(model, x8), tiling.analysis(model, x))
        for tile in (2, 64):
            assert torch.equal(tiling.masked_sse_tiled(model.g_s, y, x8, sizes, tile=tile),
                               tiling.masked_sse_tiled(model.g_s, y, x, sizes, tile=tile))
    with pytest.raises(ValueError, match="one size per image"):
        tiling.masked_sse_tiled(model.g_s, y, x8, sizes[:1])


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_codec_tiled_gives_the_same_stream_and_pixels(tiny_registry, monkeypatch):
    codec = Codec(registry=tiny_registry, device="cpu")
    image = load_image(_png(smooth_image(100, 150, seed=3)))
    amortized = InferenceConfig(method="amortized")
    whole = codec.encode(image, amortized)
    whole_rgb = decode(whole.data, registry=tiny_registry).rgb

    monkeypatch.setattr(tiling, "MIN_TILED_PIXELS", 0)  # every image is large now
    monkeypatch.setattr(tiling, "SYNTHESIS_TILE", 3)
    monkeypatch.setattr(tiling, "ANALYSIS_TILE", 48)
    tiled = codec.encode(image, amortized)
    tiled_rgb = decode(tiled.data, registry=tiny_registry).rgb
    assert tiled.data == whole.data  # the bitstream does not depend on tiling
    assert tiled_rgb.shape == (100, 150, 3)
    assert np.abs(tiled_rgb.astype(int) - whole_rgb).max() <= 1
    assert tiled.psnr == pytest.approx(whole.psnr, abs=0.01)
