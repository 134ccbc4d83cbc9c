"""The inference form of g_s (codec.model.Synthesis) computes what the modules compute.

Decoding runs it (eval mode, no autograd, CPU); training and SGA run the modules. Checked
on the shipped model and on a small one whose IGDN gamma is not diagonal (the matmul
branch), with odd sizes and a batch of two; and for thread-count determinism, which the
decoder promises.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codec.model import MeanScaleHyperprior, deconv, polyphase
from codec.registry import load

SIZES = [(1, 32, 48), (2, 5, 7), (1, 1, 1), (2, 3, 10)]  # (batch, latent rows, latent cols)


@pytest.fixture(scope="module")
def shipped() -> MeanScaleHyperprior:
    return load("msh-small-q4").model  # diagonal γ (trained from 0.1·I); decode-only now


@pytest.fixture(scope="module")
def dense_gamma() -> MeanScaleHyperprior:
    """A small model with random weights and a full (non-diagonal) gamma in every IGDN."""
    torch.manual_seed(0)
    model = MeanScaleHyperprior(N=16, M=24).eval()
    with torch.no_grad():
        for i in (1, 3, 5):
            gdn = model.g_s[i]
            gdn.gamma.copy_(gdn.gamma_reparam.init(0.02 * torch.rand(16, 16) + 0.1 * torch.eye(16)))
    return model


def _latents(M: int, batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Integer-valued latents of the magnitude the codec sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.round(3.0 * torch.randn(batch, M, h, w, generator=g))


def _fast_and_reference(model: MeanScaleHyperprior, y: torch.Tensor):
    with torch.inference_mode():
        return model.g_s(y), model.g_s.reference(y)


@pytest.mark.parametrize("size", SIZES)
def test_fast_equals_modules_on_shipped_model(shipped, size):
    y = _latents(shipped.M, *size)
    fast, ref = _fast_and_reference(shipped, y)
    assert fast.shape == ref.shape == (size[0], 3, 16 * size[1], 16 * size[2])
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert (fast.clamp(0, 1) - ref.clamp(0, 1)).abs().max() < 1e-4
    assert (fast - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))


def test_shipped_model_takes_the_diagonal_branch(shipped):
    """Its IGDN gammas are diagonal; the tiny test model's start (0.1 * I) is too."""
    assert all(g.dim() == 1 for _, _, g in shipped.g_s.fast().hidden)


@pytest.mark.parametrize("size", SIZES)
def test_fast_equals_modules_with_dense_gamma(dense_gamma, size):
    assert all(g.dim() == 2 for _, _, g in dense_gamma.g_s.fast().hidden)
    fast, ref = _fast_and_reference(dense_gamma, _latents(dense_gamma.M, *size))
    assert fast.shape == ref.shape
    assert (fast - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("model_name", ["shipped", "dense_gamma"])
def test_fast_is_independent_of_threads_and_batch(model_name, request):
    model = request.getfixturevalue(model_name)
    y = _latents(model.M, 2, 9, 13, seed=3)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = model.g_s(y)
            alone = model.g_s(y[1:])
            torch.set_num_threads(2)
            two = model.g_s(y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert torch.equal(one[1:], alone)


def test_autograd_and_training_use_the_modules(dense_gamma):
    y = _latents(dense_gamma.M, 1, 4, 5).requires_grad_(True)
    out = dense_gamma.g_s(y)  # grad enabled: the modules, differentiable
    assert out.requires_grad and out.is_contiguous()
    out.sum().backward()
    assert y.grad is not None
    dense_gamma.train()
    try:
        with torch.no_grad():
            assert torch.equal(dense_gamma.g_s(y), dense_gamma.g_s.reference(y))
    finally:
        dense_gamma.eval()


def test_hooks_see_the_modules(dense_gamma):
    """A forward hook on a layer (FLOP counters do this) must see that layer run."""
    seen = []
    handle = dense_gamma.g_s[6].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.inference_mode():
            dense_gamma.g_s(_latents(dense_gamma.M, 1, 2, 3))
    finally:
        handle.remove()
    assert seen == [(1, 3, 32, 48)]


def test_flop_counter_sees_the_modules(dense_gamma):
    """torch.utils.flop_counter (a dispatch mode) counts the model, not the fast form."""
    from torch.utils.flop_counter import FlopCounterMode

    y = _latents(dense_gamma.M, 1, 3, 4)
    counts = []
    for fn in (dense_gamma.g_s, dense_gamma.g_s.reference):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(y)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_weights_made_in_inference_mode():
    """Inference tensors have no version counter: the fast form is built, not cached."""
    with torch.inference_mode():
        model = MeanScaleHyperprior(N=8, M=12).eval()
        y = _latents(12, 1, 3, 4)
        assert (model.g_s(y) - model.g_s.reference(y)).abs().max() < 1e-5


def test_fast_form_follows_weight_changes():
    torch.manual_seed(1)
    model = MeanScaleHyperprior(N=8, M=12).eval()
    y = _latents(12, 1, 3, 4)
    with torch.inference_mode():
        first = model.g_s(y)
    other = MeanScaleHyperprior(N=8, M=12)
    model.load_state_dict(other.state_dict())  # in place, as loading weights does
    with torch.inference_mode():
        fast, ref = model.g_s(y), model.g_s.reference(y)
    assert not torch.allclose(first, fast)
    assert (fast - ref).abs().max() < 1e-5


def test_state_dict_layout_is_unchanged():
    keys = MeanScaleHyperprior(N=8, M=12).state_dict().keys()
    assert {"g_s.0.weight", "g_s.1.beta", "g_s.1.gamma", "g_s.6.bias"} <= set(keys)
    assert not any("_fast" in k for k in keys)


@pytest.mark.parametrize("cin, cout", [(5, 3), (4, 7)])
def test_polyphase_is_the_transposed_convolution(cin, cout):
    torch.manual_seed(2)
    layer = deconv(cin, cout)
    x = torch.randn(2, cin, 6, 9)
    weight, bias = polyphase(layer)
    assert weight.shape == (4 * cout, cin, 3, 3)
    phases = F.conv2d(x, weight, bias, padding=1)  # channel (a*2 + b)*cout + c
    B, _, H, W = phases.shape
    out = phases.view(B, 2, 2, cout, H, W).permute(0, 3, 4, 1, 5, 2).reshape(B, cout, 2 * H,
                                                                              2 * W)
    with torch.no_grad():
        assert torch.allclose(out, layer(x), atol=1e-5)


def test_polyphase_refuses_other_geometries():
    with pytest.raises(ValueError):
        polyphase(nn.ConvTranspose2d(4, 4, 5, stride=2, padding=2))  # output 2H - 1
