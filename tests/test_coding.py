"""Exact integer hyper-synthesis and lossless latent coding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import coding
from codec.frozen import (
    ACT_LIMIT,
    KA,
    KW,
    LATENT_LIMIT,
    CodingTables,
    freeze,
    freeze_hyper_synthesis,
    hyper_synthesis_exact,
)
from codec.model import MeanScaleHyperprior


@pytest.fixture(scope="module")
def model_and_tables():
    torch.manual_seed(1)
    model = MeanScaleHyperprior(N=16, M=24).eval()
    return model, freeze(model)


def _reference_hs(tables: CodingTables, z_hat: np.ndarray) -> np.ndarray:
    """Integer h_s with numpy int64 and explicit loops over taps: no float anywhere."""
    a = z_hat.astype(np.int64)  # (C, h, w)
    for layer in tables.hs:
        w = layer.weight.numpy()
        _, h, wd = a.shape
        kk, s, p = w.shape[-1], layer.stride, layer.padding
        if layer.transposed:  # scatter form of the transposed convolution
            cout = w.shape[1]
            ho = (h - 1) * s - 2 * p + kk + layer.output_padding
            wo = (wd - 1) * s - 2 * p + kk + layer.output_padding
            full = np.zeros((cout, (h - 1) * s + kk + layer.output_padding,
                             (wd - 1) * s + kk + layer.output_padding), np.int64)
            for i in range(kk):
                for j in range(kk):
                    contrib = np.einsum("chw,co->ohw", a, w[:, :, i, j])
                    full[:, i:i + (h - 1) * s + 1:s, j:j + (wd - 1) * s + 1:s] += contrib
            acc = full[:, p:p + ho, p:p + wo]
        else:
            cout = w.shape[0]
            ap = np.pad(a, ((0, 0), (p, p), (p, p)))
            ho, wo = (h + 2 * p - kk) // s + 1, (wd + 2 * p - kk) // s + 1
            acc = np.zeros((cout, ho, wo), np.int64)
            for i in range(kk):
                for j in range(kk):
                    patch = ap[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s]
                    acc += np.einsum("chw,oc->ohw", patch, w[:, :, i, j])
        acc = acc + layer.bias.numpy()[:, None, None]
        shift = KW + layer.in_frac - KA
        a = (acc + (1 << (shift - 1))) >> shift if shift > 0 else acc << -shift
        if layer.relu:
            a = np.clip(a, 0, ACT_LIMIT)
    return a


def _latents(model, tables, seed=0, h=128, w=192):
    torch.manual_seed(seed)
    with torch.no_grad():
        y = model.g_a(torch.rand(1, 3, h, w))
        z_hat = torch.round(model.h_a(y))
        mu_f, _ = model.hyper_synthesis(z_hat)
        k = torch.round(y - mu_f)
    return z_hat[0].long().numpy(), k[0].long().numpy(), mu_f[0].double().numpy()


def test_integer_hyper_synthesis_is_exact_and_close_to_float(model_and_tables):
    model, tables = model_and_tables
    z_hat, _, _ = _latents(model, tables)
    z_hat = z_hat + np.random.default_rng(0).integers(-40, 40, z_hat.shape)  # larger values
    mu, index = hyper_synthesis_exact(tables, z_hat[None])
    ref = _reference_hs(tables, z_hat)
    sigma_ref, mu_ref = np.split(ref, 2, axis=0)
    assert np.array_equal(mu[0], mu_ref / 2.0**KA)
    assert np.array_equal(index[0], np.searchsorted(tables.y_thresholds, sigma_ref, "right"))
    with torch.no_grad():
        mu_f, _ = model.hyper_synthesis(torch.from_numpy(z_hat).float()[None])
    assert np.abs(mu[0] - mu_f[0].double().numpy()).max() < 1e-2


def test_integer_hyper_synthesis_independent_of_threads(model_and_tables):
    model, tables = model_and_tables
    z_hat, _, _ = _latents(model, tables, h=256, w=320)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hyper_synthesis_exact(tables, z_hat[None])
        torch.set_num_threads(2)
        two = hyper_synthesis_exact(tables, z_hat[None])
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_freeze_refuses_weights_beyond_exact_range():
    model = MeanScaleHyperprior(N=8, M=8)
    with torch.no_grad():
        model.h_s[0].weight.fill_(1e6)
    with pytest.raises(ValueError, match="2\\^52"):
        freeze_hyper_synthesis(model.h_s)


def test_tables_survive_serialization(model_and_tables):
    model, tables = model_and_tables
    again = CodingTables.from_state_dict(tables.state_dict(), model.h_s)
    assert np.array_equal(again.y_thresholds, tables.y_thresholds)
    assert all(np.array_equal(a, b) for a, b in zip(again.z_pmfs, tables.z_pmfs, strict=True))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(again.hs, tables.hs, strict=True))


def test_latent_round_trip_is_exact_including_escapes(model_and_tables):
    model, tables = model_and_tables
    z_hat, k, _ = _latents(model, tables)
    rng = np.random.default_rng(3)
    k = k + rng.integers(-3, 4, k.shape)
    k.flat[rng.choice(k.size, 5, replace=False)] = [LATENT_LIMIT, -LATENT_LIMIT, 900, -77, 31]
    z_hat = z_hat.copy()
    z_hat.flat[rng.choice(z_hat.size, 3, replace=False)] = [LATENT_LIMIT, -LATENT_LIMIT, 5000]
    _, index = hyper_synthesis_exact(tables, z_hat[None])
    z_words = coding.encode_z(tables, z_hat)
    y_words = coding.encode_y(tables, k, index[0])
    assert z_words.dtype == np.uint32 and y_words.dtype == np.uint32
    assert np.array_equal(coding.decode_z(tables, z_words, z_hat.shape), z_hat)
    assert np.array_equal(coding.decode_y(tables, y_words, index[0]), k)


def test_out_of_range_latents_are_refused(model_and_tables):
    _, tables = model_and_tables
    z_hat = np.zeros((16, 2, 3), np.int64)
    z_hat[0, 0, 0] = LATENT_LIMIT + 1
    with pytest.raises(ValueError, match="codable range"):
        coding.encode_z(tables, z_hat)
