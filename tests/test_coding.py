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
        shift = layer.shift
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


def test_integer_hyper_synthesis_over_tiles_gives_the_same_bits(model_and_tables):
    """Each tile's layers compute only their receptive field (clipped at the border): any
    tile size, across tile edges and all four borders, gives the whole image's bits."""
    model, tables = model_and_tables
    z_hat, _, _ = _latents(model, tables, h=7 * 64, w=5 * 64)
    rng = np.random.default_rng(2)
    z = np.stack([z_hat, z_hat + rng.integers(-9, 10, z_hat.shape)])  # a batch of two
    whole = hyper_synthesis_exact(tables, z, tile=10**6)
    assert whole[1].dtype == np.uint8 and whole[0].shape == (2, model.M, 28, 20)
    for tile in (1, 3, 5, 8, 13):
        mu, index = hyper_synthesis_exact(tables, z, tile=tile)
        assert np.array_equal(mu, whole[0]) and np.array_equal(index, whole[1])
    # a tight layout's coded grid: the top-left part, computed alone (any tile size)
    for tile, size in ((5, (25, 17)), (10**6, (27, 20)), (3, (1, 1))):
        mu, index = hyper_synthesis_exact(tables, z, tile=tile, size=size)
        rows, cols = size
        assert np.array_equal(mu, whole[0][..., :rows, :cols])
        assert np.array_equal(index, whole[1][..., :rows, :cols])


def test_large_weights_get_fewer_fractional_bits_and_stay_exact(model_and_tables):
    """Folded rate gains can make h_s's last layer so large that KW fractional bits break the
    2^52 bound (msh-vr at one rate point did): that layer alone gets fewer, the result is
    still exact integer arithmetic, and it still tracks the float h_s."""
    model, tables = model_and_tables
    assert all(layer.weight_frac == KW for layer in tables.hs)  # small weights: unchanged
    big = MeanScaleHyperprior(N=16, M=24).eval()
    big.load_state_dict(model.state_dict())
    last = big.h_s[-1]
    with torch.no_grad():  # an l1 norm per output channel of ~2^12 needs KW - 2 or fewer
        last.weight.mul_(4096 / float(last.weight.abs().sum(dim=(1, 2, 3)).max()))
    hs = freeze_hyper_synthesis(big.h_s)
    assert hs[-1].weight_frac < KW and all(layer.weight_frac == KW for layer in hs[:-1])
    big_tables = CodingTables(hs, tables.y_thresholds, tables.y_pmfs, tables.z_pmfs,
                              tables.z_lo)
    z_hat, _, _ = _latents(model, tables)
    mu, index = hyper_synthesis_exact(big_tables, z_hat[None])
    sigma_ref, mu_ref = np.split(_reference_hs(big_tables, z_hat), 2, axis=0)
    assert np.array_equal(mu[0], mu_ref / 2.0**KA)
    assert np.array_equal(index[0], np.searchsorted(tables.y_thresholds, sigma_ref, "right"))
    with torch.no_grad():
        mu_f, _ = big.hyper_synthesis(torch.from_numpy(z_hat).float()[None])
    assert np.abs(mu[0] - mu_f[0].double().numpy()).max() < 0.1


def test_freeze_refuses_weights_beyond_exact_range():
    model = MeanScaleHyperprior(N=8, M=8)
    with torch.no_grad():
        model.h_s[0].weight.fill_(1e9)
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


# ------------------------------------------------------------------ work bound


def _shipped_tables():
    from codec.registry import load

    return load("msh-small-q4").tables


def test_quantized_cdf_is_what_constriction_codes_with(model_and_tables):
    for tables in (model_and_tables[1], _shipped_tables()):
        for pmf in list(tables.z_pmfs) + list(tables.y_pmfs)[::9]:
            cdf = coding.quantized_cdf(pmf)
            assert cdf[0] == 0 and cdf[-1] == 1 << 24 and (np.diff(cdf) >= 1).all()
            model = coding._Categorical(pmf, perfect=False)
            symbols = range(len(pmf)) if len(pmf) <= 200 else np.r_[0:60, len(pmf) - 60:len(pmf)]
            assert coding._coded_cumulative(model, symbols) == [int(cdf[s]) for s in symbols]


def _cheap_and_adversarial_groups(rng, pmfs, costs, n_max):
    """(table, symbols) groups: runs of the most probable symbol (the cheapest stream),
    runs of symbol 1 at the end (cheap once the coder's state is small), random symbols,
    and trailing first symbols (which a drained coder yields for free)."""
    groups = []
    for table in rng.choice(len(pmfs), int(rng.integers(1, 4)), replace=False):
        table = int(table)
        n = int(rng.integers(1, n_max)) if rng.random() < 0.5 else costs[table].tail + 50
        peak = int(np.argmax(pmfs[table]))
        v = np.full(n, peak, np.int64)
        mode = rng.integers(0, 4)
        if mode == 1:
            v[-int(rng.integers(1, n + 1)):] = 1
        elif mode == 2:
            v = rng.integers(0, len(pmfs[table]) - 1, n)
        elif mode == 3:
            v[-int(rng.integers(1, 40)):] = 0
        groups.append((table, v))
    return groups


def test_min_stream_bits_is_a_lower_bound_and_nearly_tight(model_and_tables):
    rng = np.random.default_rng(5)
    ratios = []
    for tables in (model_and_tables[1], _shipped_tables()):
        for pmfs, costs, models in zip((tables.z_pmfs, tables.y_pmfs), coding.table_costs(tables),
                                       coding._models(tables), strict=True):
            sizes = np.array([len(p) - 1 for p in pmfs])
            offsets = np.zeros(len(pmfs), np.int64)
            for _ in range(12):
                groups = _cheap_and_adversarial_groups(rng, pmfs, costs, 60_000)
                counts = [(t, len(v)) for t, v in groups]
                words = coding._encode_groups(groups, offsets, sizes, models, costs)
                need = coding.min_stream_bits(counts, costs)
                assert need <= 32 * len(words), (counts, need, len(words))
                ratios.append(need / max(32 * len(words), 1))
                decoded = coding._decode_groups(words, counts, offsets, sizes, models, costs)
                assert all(np.array_equal(a, v) for a, (_, v) in zip(decoded, groups,
                                                                      strict=True))
    assert max(ratios) > 0.9  # the bound is close for the cheapest streams


def test_a_stream_too_short_is_refused_before_decoding(model_and_tables, monkeypatch):
    _, tables = model_and_tables
    z_hat = np.zeros((16, 2, 3), np.int64)
    words = coding.encode_z(tables, z_hat)
    assert np.array_equal(coding.decode_z(tables, words, z_hat.shape), z_hat)

    def never(*args, **kwargs):
        raise AssertionError("decoded although the stream cannot hold the symbols")

    monkeypatch.setattr(coding, "_decode_groups", never)
    with pytest.raises(coding.BitstreamError, match="stream too short for the declared image"):
        coding.decode_z(tables, words, (16, 300, 400))
    index = np.full((24, 200, 300), 64, np.int64)  # sigma ~ 4.6: ~4 bits a symbol
    with pytest.raises(coding.BitstreamError, match="stream too short for the declared image"):
        coding.decode_y(tables, words, index)


def _raw_encode(groups, models):
    """What a plain constriction encoder writes, free symbols included (no escapes here)."""
    coder = coding.constriction.stream.stack.AnsCoder()
    for table, s in reversed(groups):
        coder.encode_reverse(s.astype(np.int32), models[table])
    return coder.get_compressed()


def test_symbols_decoded_without_data_are_refused_and_never_written(model_and_tables):
    _, tables = model_and_tables
    zc, yc = coding.table_costs(tables)
    z_models, y_models = coding._models(tables)
    sizes = np.array([len(p) - 1 for p in tables.z_pmfs])
    lo = np.zeros(len(sizes), np.int64)
    peak = int(np.argmax(tables.z_pmfs[0]))
    # A drained coder: everything after the real data decodes as symbol 0, for free.
    body = np.full(500, peak, np.int64)
    words = _raw_encode([(0, body)], z_models)
    for extra in (1, 7, 5000):
        with pytest.raises(coding.BitstreamError, match=r"without data|ran out"):
            coding._decode_groups(words, [(0, 500 + extra)], lo, sizes, z_models, zc)
    with pytest.raises(coding.BitstreamError, match="ran out"):
        coding._decode_groups(words, [(0, 500), (1, 10)], lo, sizes, z_models, zc)
    # Trailing first symbols in a real group: held for free by a plain encoder (refused),
    # escaped by ours (decoded back exactly).
    values = np.concatenate([body, np.zeros(30, np.int64)])
    with pytest.raises(coding.BitstreamError, match="without data"):
        coding._decode_groups(_raw_encode([(0, values)], z_models), [(0, 530)], lo, sizes,
                              z_models, zc)
    words = coding._encode_groups([(0, values)], lo, sizes, z_models, zc)
    assert np.array_equal(coding._decode_groups(words, [(0, 530)], lo, sizes, z_models, zc)[0],
                          values)
    # A free symbol behind a non-empty state: x = c of the last symbol < f of the first
    # symbol of the table before it.
    f0 = [int(c.cdf[1]) for c in yc]
    big, small = int(np.argmax(f0)), int(np.argmin(f0))
    assert f0[big] > f0[small]  # c of symbol 1 of `small` is f0[small]
    y_sizes = np.array([len(p) - 1 for p in tables.y_pmfs])
    y_lo = np.zeros(len(y_sizes), np.int64)
    groups = [(big, np.zeros(3, np.int64)), (small, np.ones(1, np.int64))]
    counts = [(big, 3), (small, 1)]
    with pytest.raises(coding.BitstreamError, match="without data"):
        coding._decode_groups(_raw_encode(groups, y_models), counts, y_lo, y_sizes, y_models, yc)
    words = coding._encode_groups(groups, y_lo, y_sizes, y_models, yc)
    out = coding._decode_groups(words, counts, y_lo, y_sizes, y_models, yc)
    assert all(np.array_equal(a, v) for a, (_, v) in zip(out, groups, strict=True))
