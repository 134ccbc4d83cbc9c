"""The variable-rate model: rate points fold into a plain model, streams carry the point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec.api import Codec, decode
from codec.bitstream import parse
from codec.errors import BitstreamError, ModelError
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.registry import QUALITY_LMBDAS, entries, find, load, load_point
from codec.variable_rate import RATE_STEPS, GainedMeanScaleHyperprior, widen
from tests.conftest import SHIPPED_VR_ID, TINY_ID, TINY_VR_ID, smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_gains(model: GainedMeanScaleHyperprior, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.gain, model.inverse_gain, model.hyper_gain, model.hyper_inverse_gain):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))


def test_materialized_point_is_the_gained_forward():
    """At a trained point the folded plain model computes what training's forward does."""
    torch.manual_seed(0)
    vr = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032)).eval()
    _random_gains(vr)
    x = torch.rand(2, 3, 64, 64)
    for r in range(vr.num_rates):
        net = vr.materialize(vr.gain_tables(), r * RATE_STEPS)
        g = vr.gains(torch.tensor([r, r]))
        with torch.no_grad():
            y = vr.base.g_a(x) * g["gain"]
            z = vr.base.h_a(vr.base.g_a(x)) * g["hyper_gain"]
            torch.testing.assert_close(net.g_a(x), y, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(net.h_a(net.g_a(x)), z, rtol=1e-4, atol=1e-4)
            z_hat = torch.round(z)
            sigma, mu = vr.base.h_s(z_hat * g["hyper_inverse_gain"]).chunk(2, dim=1)
            mu2, sigma2 = net.hyper_synthesis(z_hat)
            torch.testing.assert_close(mu2, mu * g["gain"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sigma2, sigma * g["gain"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(net.g_s(torch.round(y)),
                                       vr.base.g_s(torch.round(y) * g["inverse_gain"]),
                                       rtol=1e-4, atol=1e-4)


def test_rate_grid_interpolates_between_trained_points():
    vr = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032))
    _random_gains(vr)
    tables = vr.gain_tables()
    assert tables.gain.shape == (2 * RATE_STEPS + 1, 24)
    half = RATE_STEPS // 2
    expected = torch.sqrt(vr.gain[0].abs() * vr.gain[1].abs())  # geometric midpoint
    torch.testing.assert_close(tables.gain[half], expected.detach(), rtol=1e-5, atol=1e-6)
    assert vr.rate_lmbda(half) == pytest.approx(0.004)
    assert vr.rate_for_lmbda(0.004) == half
    assert vr.rate_for_lmbda(1e-9) == 0 and vr.rate_for_lmbda(1.0) == vr.max_rate_index


def test_registry_entry_and_named_qualities(tiny_vr_registry):
    entry = find(TINY_VR_ID, tiny_vr_registry)
    assert entry.variable_rate and entry.quality == 0 and entry.lmbdas == (0.002, 0.008, 0.032)
    assert find(None, tiny_vr_registry).id == TINY_ID  # not the default until marked so
    lm = load(TINY_VR_ID, tiny_vr_registry)
    assert lm.rate is not None and lm.variable is not None
    point = lm.at(5)
    assert point.rate == 5 and point.entry.lmbda == pytest.approx(lm.variable.rate_lmbda(5))
    assert lm.quality_rate(3) == lm.rate_for_lmbda(QUALITY_LMBDAS[3])
    with pytest.raises(ModelError, match="outside"):
        lm.at(lm.variable.max_rate_index + 1)
    with pytest.raises(ModelError, match="fixed-rate"):
        load_point(TINY_ID, 3, tiny_vr_registry)


@pytest.mark.parametrize("rate", [0, 7, 2 * RATE_STEPS])
def test_round_trip_at_rate_points(tiny_vr_registry, rate, tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 56)).save(path)
    codec = Codec(TINY_VR_ID, device="cpu", registry=tiny_vr_registry, rate=rate)
    result = codec.encode(load_image(path), InferenceConfig(method="sga", iterations=3))
    assert result.rate == rate
    header = parse(result.data).header
    assert header.rate == rate and header.version == 2
    decoded = decode(result.data, registry=tiny_vr_registry)
    assert decoded.rgb.shape == (40, 56, 3)


def test_rate_changes_the_rate(tiny_vr_registry, tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(64, 64)).save(path)
    image = load_image(path)
    codec = Codec(TINY_VR_ID, device="cpu", registry=tiny_vr_registry, rate=0)
    low = codec.encode(image, InferenceConfig(method="amortized"))
    high = codec.at_rate(2 * RATE_STEPS).encode(image, InferenceConfig(method="amortized"))
    assert high.payload_bits > low.payload_bits


def test_fixed_rate_streams_stay_version_1(tiny_vr_registry, tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 56)).save(path)
    result = Codec(TINY_ID, device="cpu", registry=tiny_vr_registry).encode(
        load_image(path), InferenceConfig(method="amortized"))
    assert result.data[4] == 1 and result.rate is None
    assert parse(result.data).header.rate is None


def test_stream_and_model_must_agree_on_rate(tiny_vr_registry, tmp_path):
    from dataclasses import replace

    from PIL import Image

    from codec.bitstream import Bitstream, pack

    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 56)).save(path)
    result = Codec(TINY_VR_ID, device="cpu", registry=tiny_vr_registry, rate=3).encode(
        load_image(path), InferenceConfig(method="amortized"))
    bs = parse(result.data)
    no_rate = pack(Bitstream(replace(bs.header, rate=None), bs.sections))
    with pytest.raises(BitstreamError, match="rate point"):
        decode(no_rate, registry=tiny_vr_registry)
    too_high = pack(Bitstream(replace(bs.header, rate=9999), bs.sections))
    with pytest.raises(BitstreamError, match="rate point"):
        decode(too_high, registry=tiny_vr_registry)
    assert np.array_equal(decode(result.data, registry=tiny_vr_registry).rgb,
                          decode(result.data, registry=tiny_vr_registry).rgb)


def _sample_crop(size: int = 96):
    """A crop of a real photo (scikit-image's sample), as the codec takes it."""
    import io

    from PIL import Image

    skimage = pytest.importorskip("skimage")
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[100:100 + size, 150:150 + size]).save(buf, "PNG")
    return load_image(buf.getvalue())


def test_first_true_bisects_monotone_predicates():
    from codec.targets import _first_true

    calls = []

    def at_least(k):
        def pred(i):
            calls.append(i)
            return i >= k
        return pred

    for k in (0, 1, 37, 256):
        calls.clear()
        assert _first_true(at_least(k), 0, 256) == k
        assert len(calls) <= 10  # log2(257) + 1 encodings
    assert _first_true(at_least(300), 0, 256) is None


@pytest.mark.parametrize("goal_at", [0.25, 0.75])
def test_target_psnr_on_the_shipped_model(goal_at):
    """The shipped variable-rate model reaches a PSNR target between its ends, at a rate
    point whose amortized PSNR meets it, and flags one it cannot reach."""
    from codec.targets import Target

    image = _sample_crop()
    codec = Codec(SHIPPED_VR_ID, device="cpu")
    amortized = InferenceConfig(method="amortized")
    top = codec.lm.variable.max_rate_index
    low, high = (codec.at_rate(r).encode(image, amortized) for r in (0, top))
    assert high.psnr > low.psnr + 3 and high.bpp > low.bpp
    goal = low.psnr + goal_at * (high.psnr - low.psnr)
    result = codec.encode_to_target(image, Target("psnr", goal),
                                    InferenceConfig(method="sga", iterations=5))
    assert result.target == "psnr" and result.target_met and result.psnr >= goal
    assert 0 < result.rate < top and parse(result.data).header.rate == result.rate
    assert decode(result.data).rgb.shape == (96, 96, 3)

    unreachable = codec.encode_to_target(image, Target("psnr", high.psnr + 20), amortized)
    assert unreachable.target_met is False and unreachable.rate == top
    assert "MISSED" in unreachable.summary()


def test_target_bpp_on_the_shipped_model():
    from codec.targets import Target

    image = _sample_crop()
    codec = Codec(SHIPPED_VR_ID, device="cpu")
    amortized = InferenceConfig(method="amortized")
    top = codec.lm.variable.max_rate_index
    low, high = (codec.at_rate(r).encode(image, amortized) for r in (0, top))
    budget = (low.bpp + high.bpp) / 2
    result = codec.encode_to_target(image, Target("bpp", budget), amortized)
    assert result.target_met and result.bpp <= budget and 0 < result.rate < top
    too_small = codec.encode_to_target(image, Target("bpp", low.bpp / 10), amortized)
    assert too_small.target_met is False and too_small.rate == 0


def test_target_needs_a_variable_rate_model(tiny_vr_registry):
    from codec.targets import Target

    codec = Codec(TINY_ID, device="cpu", registry=tiny_vr_registry)
    with pytest.raises(ModelError, match="variable-rate"):
        codec.encode_to_target(_sample_crop(), Target("psnr", 30))
    with pytest.raises(ValueError):
        Target("psnr", -1)


def test_widened_model_computes_the_same_function():
    """widen: z, the old channels' mu and sigma and the image are unchanged; each new channel
    is a split of an old one (its latents, mu and sigma), and every new weight gets a
    gradient."""
    torch.manual_seed(0)
    vr = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032)).eval()
    _random_gains(vr)
    wide = widen(vr, 40).eval()
    x, r = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    sources = [i % 24 for i in range(16)]
    with torch.no_grad():
        g, gw = vr.gains(r), wide.gains(r)
        y, yw = vr.base.g_a(x), wide.base.g_a(x)
        torch.testing.assert_close(yw[:, :24], y)
        torch.testing.assert_close(yw[:, 24:] * gw["gain"][:, 24:],
                                   (y * g["gain"])[:, sources])
        z = torch.round(vr.base.h_a(y) * g["hyper_gain"])
        torch.testing.assert_close(torch.round(wide.base.h_a(yw) * gw["hyper_gain"]), z)
        sigma, mu = vr.base.h_s(z * g["hyper_inverse_gain"]).chunk(2, dim=1)
        sigma_w, mu_w = wide.base.h_s(z * gw["hyper_inverse_gain"]).chunk(2, dim=1)
        torch.testing.assert_close(sigma_w, torch.cat([sigma, sigma[:, sources]], dim=1))
        torch.testing.assert_close(mu_w, torch.cat([mu, mu[:, sources]], dim=1))
        torch.testing.assert_close(wide.base.g_s(yw * gw["gain"] * gw["inverse_gain"]),
                                   vr.base.g_s(y * g["gain"] * g["inverse_gain"]))
    wide.train()
    out = wide(x, r)
    (out["x_hat"].square().mean() - sum(torch.log(v).sum() for v in
                                        out["likelihoods"].values())).backward()
    b = wide.base  # the new channels' weights: rows of g_a, g_s, h_s; columns of h_a
    for grad in (b.g_a[-1].weight.grad[24:], b.g_s[0].weight.grad[24:],
                 b.h_s[4].weight.grad[24:], b.h_a[0].weight.grad[:, 24:]):
        assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="already has M=24"):
        widen(vr, 24)


def test_dead_channels_are_revived_by_splitting_live_ones():
    """revive_dead_channels: a latent channel that costs no bits at the top λ becomes a
    split of a live one (its latents nonzero again), and Adam's state for the changed
    tensors is dropped so it starts them afresh."""
    from codec.train import channel_bits, revive_dead_channels

    torch.manual_seed(0)
    vr = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032))
    _random_gains(vr)
    with torch.no_grad():
        vr.gain.abs_().mul_(20.0)  # every live channel costs bits at the top λ
        vr.base.g_a[-1].weight[[3, 7]] = 0.0  # two channels that round to zero everywhere
        vr.base.g_a[-1].bias[[3, 7]] = 0.0
        hs = vr.base.h_s[-1]  # ... with mu = 0 and sigma at its bound: no bits
        hs.weight[[3, 7, 27, 31]], hs.bias[[3, 7, 27, 31]] = 0.0, 0.0
    x = torch.rand(2, 3, 64, 64)
    before = channel_bits(vr, x, 2)
    assert before[[3, 7]].max() < 1e-3 < before.mean()
    opt = torch.optim.Adam(vr.parameters())
    vr(x, torch.tensor([0, 2]))["x_hat"].square().mean().backward()
    opt.step()
    assert revive_dead_channels(vr, opt, x) == [3, 7]
    after = channel_bits(vr, x, 2)
    assert after[[3, 7]].min() > 0.1 * before.mean()
    assert vr.base.g_a[-1].weight not in opt.state and vr.base.g_a[0].weight in opt.state
    assert revive_dead_channels(vr, opt, x) == []


def test_training_gains_between_trained_points_are_the_exported_tables():
    """TrainConfig.rate_grid trains the points between trained λ with the same gains and λ
    that export stores for them, and their gradients reach both neighbouring points."""
    from codec.variable_rate import GAIN_NAMES

    vr = GainedMeanScaleHyperprior(N=16, M=24, lmbdas=(0.002, 0.008, 0.032))
    _random_gains(vr)
    tables = vr.gain_tables()
    index = torch.tensor([0, 5, 16, 31, 32, 47, 2 * RATE_STEPS])
    gains = vr.gains(index.float() / RATE_STEPS)
    for name in GAIN_NAMES:
        torch.testing.assert_close(gains[name][:, :, 0, 0], getattr(tables, name)[index],
                                   rtol=1e-5, atol=1e-6)
    assert vr.lmbda_at(index.float() / RATE_STEPS).tolist() == pytest.approx(
        [vr.rate_lmbda(i) for i in index.tolist()], rel=1e-6)
    assert vr.lmbda_at(torch.tensor([1])).item() == pytest.approx(0.008)  # a trained point
    gains["gain"][2].sum().backward()  # grid index 16: halfway between points 0 and 1
    assert vr.gain.grad[0].abs().sum() > 0 and vr.gain.grad[1].abs().sum() > 0
    assert vr.gain.grad[2].abs().sum() == 0


def _restricted(registry, tmp_path, step: int):
    """A copy of `registry` whose variable-rate entry encodes at multiples of `step` only."""
    import json
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(registry.parent, copy)
    data = json.loads((copy / registry.name).read_text())
    for e in data["models"]:
        if e["id"] == TINY_VR_ID:
            e["rate_step"] = step
    (copy / registry.name).write_text(json.dumps(data))
    return copy / registry.name


def test_rate_step_limits_encoding_not_decoding(tiny_vr_registry, tmp_path):
    """A model with rate_step (msh-vr3: its trained points only) refuses other points for
    encoding, names qualities and searches targets on its multiples, and still decodes a
    stream coded at any point."""
    from codec.targets import Target

    restricted = _restricted(tiny_vr_registry, tmp_path, RATE_STEPS)
    image = _sample_crop()
    amortized = InferenceConfig(method="amortized")
    stream = Codec(TINY_VR_ID, registry=tiny_vr_registry).at_rate(48).encode(image, amortized)
    codec = Codec(TINY_VR_ID, registry=restricted)
    assert codec.rate % RATE_STEPS == 0
    with pytest.raises(ModelError, match=f"multiple of {RATE_STEPS}"):
        codec.at_rate(48)
    with pytest.raises(ModelError, match=f"multiple of {RATE_STEPS}"):
        load_point(TINY_VR_ID, 48, restricted)
    lm = load(TINY_VR_ID, restricted)
    assert all(lm.quality_rate(q) % RATE_STEPS == 0 for q in QUALITY_LMBDAS)
    for target in (Target("bpp", stream.bpp), Target("psnr", stream.psnr)):
        assert codec.encode_to_target(image, target, amortized).rate % RATE_STEPS == 0
    ours = decode(stream.data, registry=restricted)
    assert np.array_equal(ours.rgb, decode(stream.data, registry=tiny_vr_registry).rgb)


@pytest.mark.parametrize("model_id", [e.id for e in entries()
                                      if e.variable_rate and not e.decode_only])
def test_shipped_variable_rate_models_are_monotone_where_they_encode(model_id):
    """Each shipped variable-rate model's amortized rate rises and its PSNR does not fall
    along the rate points it encodes at (every 8th of the grid, or its rate_step): msh-vr3
    fell by up to 5 dB between its trained points, which a target search would pick."""
    image = _sample_crop()
    codec = Codec(model_id, device="cpu")
    step = max(8, codec.lm.entry.rate_step)
    points = range(0, codec.lm.variable.max_rate_index + 1, step)
    results = [codec.at_rate(r).encode(image, InferenceConfig(method="amortized"))
               for r in points]
    for r, a, b in zip(points, results, results[1:], strict=False):
        assert b.bpp > a.bpp and b.psnr > a.psnr - 0.1, (r, a.bpp, a.psnr, b.bpp, b.psnr)


def test_a_variable_rate_default_owns_the_quality_levels(tiny_vr_registry, tmp_path):
    """Once the variable-rate model is marked default, quality levels name its rate points
    ahead of the fixed levels it supersedes (which stay reachable by id, for decoding)."""
    import shutil
    from dataclasses import replace

    from codec.registry import register

    reg = tmp_path / "registry.json"
    for f in tiny_vr_registry.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert find(1, reg).id == TINY_ID
    register(replace(find(TINY_VR_ID, reg), default=True), reg)
    assert find(None, reg).id == find(1, reg).id == TINY_VR_ID
    assert find(TINY_ID, reg).id == TINY_ID
    point = load_point(1, registry=reg)
    assert point.rate == point.quality_rate(1)
