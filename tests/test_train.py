"""`sgarc train`: the loss goes down, checkpoints resume exactly, export lands in a registry."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from codec.api import Codec, decode
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.registry import entries, load, read_model_file
from codec.train import TrainConfig, train
from jobs.train import log_path, main, register
from tests.conftest import smooth_image

TINY = ["--N", "8", "--M", "8", "--crop", "64", "--batch-size", "2", "--lr", "1e-3",
        "--lmbda", "0.01", "--log-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    for i in range(8):
        Image.fromarray(smooth_image(96, 96, seed=i)).save(folder / f"{i}.png")
    return folder


def test_register_adds_the_train_command():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", "d", "--checkpoint", "c.ckpt"])
    assert args.func.__name__ == "cmd_train" and args.data == ["d"] and args.steps > 0


def test_loss_goes_down(data, tmp_path):
    records = []
    cfg = TrainConfig(data=[str(data)], lmbda=0.01, N=8, M=8, steps=40, batch_size=2, crop=64,
                      lr=1e-3, log_every=1, checkpoint_every=100)
    train(cfg, tmp_path / "run.ckpt", log=lambda _: None, on_record=records.append)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


def test_resume_continues_at_the_saved_step_exactly(data, tmp_path, capsys):
    common = ["--data", str(data), *TINY, "--checkpoint-every", "3"]
    straight = tmp_path / "straight.ckpt"
    assert main([*common, "--checkpoint", str(straight), "--steps", "10"]) == 0

    ckpt = tmp_path / "resumed.ckpt"
    assert main([*common, "--checkpoint", str(ckpt), "--steps", "6"]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    with log_path(ckpt).open("a") as f:  # a record written after the last checkpoint
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    capsys.readouterr()
    assert main([*common, "--checkpoint", str(ckpt), "--steps", "10"]) == 0
    assert f"resumed from {ckpt} at step 6" in capsys.readouterr().err

    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 10
    steps = [json.loads(line)["step"] for line in log_path(ckpt).read_text().splitlines()]
    assert steps == list(range(1, 11))
    ref = torch.load(straight, weights_only=True)["model"]
    for k, v in state["model"].items():  # crops, noise and Adam state all carried over
        assert torch.equal(v, ref[k]), k


def test_resume_with_other_model_settings_is_refused(data, tmp_path, capsys):
    ckpt = tmp_path / "c.ckpt"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "2"]) == 0
    args = ["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "4", "--M", "16"]
    assert main(args) == 2
    assert "other settings (M 8 -> 16)" in capsys.readouterr().err


def test_bad_options_are_clear_errors(data, tmp_path, capsys):
    ckpt = str(tmp_path / "c.ckpt")
    assert main(["--data", str(data), "--checkpoint", ckpt, "--crop", "32"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert main(["--data", str(data), *TINY, "--checkpoint", ckpt, "--export", "x"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope"), "--checkpoint", ckpt]) == 2


def test_export_into_a_registry(data, tmp_path):
    registry = tmp_path / "weights" / "registry.json"
    ckpt = tmp_path / "c.ckpt"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "5",
                 "--export", "tiny-trained", "--quality", "2", "--registry", str(registry),
                 "--note", "test"]) == 0
    (entry,) = entries(registry)
    assert (entry.id, entry.quality, entry.lmbda, entry.N, entry.M, entry.steps) == \
        ("tiny-trained", 2, 0.01, 8, 8, 5)
    assert entry.note == "test" and "64px crops" in entry.data
    lm = load("tiny-trained", registry)  # sha256 verified on load
    state = read_model_file(entry, registry)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())

    image = load_image(data / "0.png")
    result = Codec(2, device="cpu", registry=registry).encode(
        image, InferenceConfig(method="amortized"))
    assert result.model_id == lm.entry.id
    assert decode(result.data, registry=registry).rgb.shape == (96, 96, 3)

    # a finished run exports again without training further
    assert main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "5",
                 "--export", "tiny-trained", "--quality", "2", "--registry", str(registry)]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_init_from_starts_a_new_run_from_other_weights(data, tmp_path, capsys):
    parent = tmp_path / "parent.ckpt"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(parent), "--steps", "3"]) == 0
    registry = tmp_path / "weights" / "registry.json"
    child = tmp_path / "child.ckpt"
    # lr 0: Adam leaves the weights where --init-from put them
    args = ["--data", str(data), *TINY, "--checkpoint", str(child), "--steps", "2",
            "--lr", "0", "--init-from", str(parent)]
    assert main([*args, "--export", "child", "--quality", "1", "--registry",
                 str(registry)]) == 0
    assert f"initialized from {parent} (3 steps)" in capsys.readouterr().err
    got, ref = (torch.load(p, weights_only=True)["model"] for p in (child, parent))
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    assert entries(registry)[0].steps == 3 + 2  # the registry counts the parent's steps

    wrong = ["--data", str(data), *TINY, "--checkpoint", str(tmp_path / "w.ckpt"),
             "--steps", "1", "--M", "16", "--init-from", str(parent)]
    assert main(wrong) == 2
    assert "N, M or rate points differ" in capsys.readouterr().err
    missing = ["--data", str(data), *TINY, "--checkpoint", str(tmp_path / "m.ckpt"),
               "--steps", "1", "--init-from", "no-such-model"]
    assert main(missing) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_variable_rate_training_fine_tunes_a_fixed_model_and_exports(data, tmp_path, capsys):
    """--lmbdas trains one gained model from a fixed-rate one; it exports with quality 0 and
    codes at any of its rate points; quality levels name rate points once it is default."""
    registry = tmp_path / "weights" / "registry.json"
    fixed = tmp_path / "fixed.ckpt"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(fixed), "--steps", "2",
                 "--lmbda", "0.004"]) == 0
    ckpt = tmp_path / "vr.ckpt"
    args = ["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "3",
            "--lmbdas", "0.002,0.004,0.008", "--init-from", str(fixed)]
    assert main([*args, "--quality", "2", "--export", "x"]) == 2
    assert "leave out --quality" in capsys.readouterr().err
    assert main([*args, "--export", "tiny-vr", "--default", "--registry", str(registry)]) == 0
    state = torch.load(ckpt, weights_only=True)
    gain = state["model"]["gain"]
    assert gain.shape == (3, 8)  # init_from_fixed: step sqrt(0.004 / λ_r), then 3 Adam steps
    assert torch.allclose(gain[:, 0], torch.tensor([0.5, 1.0, 2.0]) ** 0.5, atol=0.05)
    (entry,) = entries(registry)
    assert entry.variable_rate and entry.quality == 0 and entry.default
    assert main([*args[:-2], "--lmbdas", "0.002,0.01"]) == 2  # other rate points: refused
    assert "other settings" in capsys.readouterr().err

    image = load_image(data / "0.png")
    for quality in (1, 6):  # named rate points of the default variable-rate model
        result = Codec(quality, device="cpu", registry=registry).encode(
            image, InferenceConfig(method="amortized"))
        assert result.model_id == "tiny-vr" and result.rate is not None
        assert decode(result.data, registry=registry).rgb.shape == (96, 96, 3)
    assert main(["--data", str(data), *TINY, "--checkpoint", str(tmp_path / "y.ckpt"),
                 "--lmbdas", "0.002,0.001"]) == 2


def test_rate_grid_training_trains_the_points_between(data, tmp_path, monkeypatch):
    """--rate-grid draws rate positions from the whole grid (floats between the trained
    points), resumes a run trained without it, and the gains between points learn."""
    from codec.variable_rate import RATE_STEPS, GainedMeanScaleHyperprior

    seen = []
    forward = GainedMeanScaleHyperprior.forward

    def spy(self, x, r, **options):
        seen.append(r.clone())
        return forward(self, x, r, **options)

    monkeypatch.setattr(GainedMeanScaleHyperprior, "forward", spy)
    ckpt = tmp_path / "vr.ckpt"
    args = ["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--lmbdas",
            "0.002,0.004,0.008"]
    assert main([*args, "--steps", "2"]) == 0
    assert all(not r.is_floating_point() for r in seen)  # trained points only
    seen.clear()
    before = torch.load(ckpt, weights_only=True)["model"]["gain"]
    assert main([*args, "--steps", "12", "--rate-grid"]) == 0
    positions = torch.cat(seen)
    assert positions.is_floating_point() and positions.min() >= 0 and positions.max() <= 2
    assert ((positions * RATE_STEPS) % 1 == 0).all()  # grid points
    assert (positions % 1 != 0).any()  # some between trained points
    assert not torch.equal(torch.load(ckpt, weights_only=True)["model"]["gain"], before)
    assert TrainConfig(data=[]).rate_grid is False


def test_device_sampler_cuts_the_same_kind_of_crops():
    """The GPU session's sampler (images on the device) gives crops of the images, with
    flips, and resumes its stream from its state; run here on the CPU device."""
    import numpy as np

    from codec.train import DeviceCropSampler

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    sampler = DeviceCropSampler(images, 16, seed=1, device=torch.device("cpu"))
    state = sampler.get_state()
    x = sampler.batch(6)
    assert x.shape == (6, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    for crop in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        found = False
        for im in images:
            for variant in (im, im[:, ::-1], im[::-1], im[::-1, ::-1]):
                windows = np.lib.stride_tricks.sliding_window_view(variant, (16, 16, 3))
                if (windows == crop).all(axis=(-3, -2, -1)).any():
                    found = True
        assert found
    sampler.set_state(state)
    assert torch.equal(sampler.batch(6), x)
    assert sampler.rate_points(5, 9).max() < 9


def test_compacted_checkpoint_resumes(data, tmp_path):
    """The committed resume point: float16 weights, no Adam moments; resuming rebuilds the
    moments under a learning-rate warm-up and writes full checkpoints again."""
    from codec.train import REWARM_STEPS, compact_checkpoint

    ckpt = tmp_path / "c.ckpt"
    assert main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "2"]) == 0
    before = ckpt.stat().st_size
    weights = torch.load(ckpt, weights_only=True)["model"]
    compact_checkpoint(ckpt)
    assert ckpt.stat().st_size < 0.4 * before
    state = torch.load(ckpt, weights_only=True)
    assert state["optimizer"]["state"] == {} and state["step"] == 2
    assert all(torch.equal(v.half(), state["model"][k]) for k, v in weights.items()
               if v.is_floating_point())
    assert main(["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--steps", "4"]) == 0
    records = [json.loads(line) for line in ckpt.with_suffix(".log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["step"] > 2]
    assert lrs == pytest.approx([1e-3 / REWARM_STEPS, 2e-3 / REWARM_STEPS])  # from step 2
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4
    assert state["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32


def test_rate_weights_favour_the_low_rates_and_average_one_over_the_grid():
    """--rate-weight-power P: each crop's loss weighted by (λ_r/λ_0)^-P, mean 1 over the
    grid (so the learning rate keeps its meaning), falling with the rate; P=0 is uniform."""
    from codec.train import rate_weights
    from codec.variable_rate import RATE_STEPS, GainedMeanScaleHyperprior

    net = GainedMeanScaleHyperprior(8, 8, (0.001, 0.004, 0.016))
    grid = torch.arange(net.max_rate_index + 1).float() / RATE_STEPS
    w = rate_weights(net, grid, 0.5)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (w.diff() < 0).all()
    assert (w[0] / w[-1]).item() == pytest.approx(16.0**0.5, rel=1e-4)  # λ ratio 16
    assert torch.allclose(rate_weights(net, grid, 0.0), torch.ones_like(grid))
    assert TrainConfig(data=[]).rate_weight_power == 0.0


def test_learning_rate_cooldowns():
    """Stable at lr until lr_drop_at, then the cooldown: a 10x step, or down to 0 at the
    end, linearly or as 1 - sqrt(t); an unknown shape is refused."""
    from codec.train import learning_rate

    def lr(shape, progress):
        return learning_rate(TrainConfig(data=[], lr=1e-3, lr_drop_at=0.8,
                                         lr_cooldown=shape), progress)

    for shape in ("step", "linear", "sqrt"):
        assert lr(shape, 0.0) == lr(shape, 0.79) == 1e-3
    assert lr("step", 0.8) == lr("step", 1.0) == pytest.approx(1e-4)
    assert lr("linear", 0.9) == pytest.approx(5e-4)
    assert lr("sqrt", 0.85) == pytest.approx(5e-4)  # t = 1/4
    assert lr("linear", 1.0) == lr("sqrt", 1.0) == 0.0
    assert lr("sqrt", 0.95) < lr("linear", 0.95)  # 1 - sqrt falls faster early
    with pytest.raises(ValueError, match="cosine"):
        lr("cosine", 0.9)


def test_rate_weighted_training_runs_and_resumes(data, tmp_path):
    ckpt = tmp_path / "vr.ckpt"
    args = ["--data", str(data), *TINY, "--checkpoint", str(ckpt), "--lmbdas",
            "0.002,0.004,0.008", "--rate-grid", "--rate-weight-power", "0.6"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "4"]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 4


def test_hyper_synthesis_of_a_shipped_model_stays_fixed_and_is_shared(data, tmp_path, capsys):
    """--hyper-synthesis-of: the run's h_s is that model's, untouched by training and by
    resuming, and the export holds the very tensors of its file, which the weight store
    then keeps once (its digests); the rest trains. Misfits are refused."""
    from codec.weight_store import digest

    ckpt, registry = tmp_path / "vr.ckpt", tmp_path / "weights" / "registry.json"
    args = ["--data", str(data), *TINY, "--N", "64", "--M", "96", "--lmbdas", "default",
            "--checkpoint", str(ckpt), "--hyper-synthesis-of", "msh-vr2"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3", "--export", "tiny-shared", "--registry",
                 str(registry)]) == 0  # resumed, then exported (fp16)
    state = torch.load(ckpt, weights_only=True)["model"]
    source = read_model_file(load("msh-vr2").entry)["state_dict"]
    exported = read_model_file(entries(registry)[0], registry)["state_dict"]
    h_s = [k for k in source if k.startswith("base.h_s.")]
    assert len(h_s) == 6
    for k in h_s:
        assert torch.equal(state[k], source[k].float())
        assert digest(exported[k]) == digest(source[k])  # what pack() shares
    assert not torch.equal(state["base.g_s.0.weight"].half(), source["base.g_s.0.weight"])

    assert main([*args[:-1], "msh-vr5", "--steps", "1"]) == 2  # M=192: another shape
    assert "not N=64, M=96" in capsys.readouterr().err
    assert main([*args, "--steps", "4", "--revive-dead-channels"]) == 2
    assert "one or the other" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["synthesis", "analysis"])
def test_fine_tune_trains_one_side_on_the_latents_coding_rounds(side, data, tmp_path, capsys):
    """--fine-tune SIDE: the forward's latents and rate are those of amortized coding (hard
    rounding), only that side's parameters train (codec.variable_rate.FINE_TUNE_PARTS), and the
    export holds every other tensor of --init-from's weights as it was (what the weight
    store then keeps once)."""
    from codec.inference import InferenceConfig, infer
    from codec.train import rd_loss_terms
    from codec.variable_rate import FINE_TUNE_PARTS, RATE_STEPS, GainedMeanScaleHyperprior

    torch.manual_seed(0)
    net = GainedMeanScaleHyperprior(8, 8, (0.002, 0.004, 0.008)).eval()
    x = torch.from_numpy(smooth_image(64, 64, seed=3)).permute(2, 0, 1)[None].float() / 255
    out = net(x, torch.tensor([1]), hard=side)
    coded = infer(net.materialize(net.gain_tables(), RATE_STEPS), x, [(64, 64)], 0.004,
                  InferenceConfig(method="amortized"))
    # the decoder reads the coded latents on either side; the rate is theirs for
    # "synthesis", and for "analysis" the noisy proxy that the encoder learns from
    with torch.no_grad():
        exact = net(x, torch.tensor([1]), hard="synthesis")
    assert torch.allclose(out["x_hat"], exact["x_hat"], atol=1e-5)
    exact_bpp = rd_loss_terms(x, exact, 0.004)["bpp"].item()
    assert exact_bpp == pytest.approx(float(coded.start_terms["bpp"][0]), rel=1e-5)
    terms = rd_loss_terms(x, out, 0.004)
    terms["loss"].backward()
    assert (net.base.g_a[0].weight.grad is not None) == (side == "analysis")
    assert net.base.g_s[0].weight.grad is not None  # the distortion reads g_s either way

    start, ckpt = tmp_path / "start.ckpt", tmp_path / "tuned.ckpt"
    registry = tmp_path / "weights" / "registry.json"
    common = ["--data", str(data), *TINY, "--lmbdas", "0.002,0.004,0.008"]
    assert main([*common, "--checkpoint", str(start), "--steps", "2"]) == 0
    assert main([*common, "--checkpoint", str(ckpt), "--init-from", str(start),
                 "--fine-tune", side, "--steps", "2", "--export", "tiny-tuned",
                 "--registry", str(registry)]) == 0
    before = torch.load(start, weights_only=True)["model"]
    exported = read_model_file(entries(registry)[0], registry)["state_dict"]
    for k, t in before.items():
        trained = any(k == p or k.startswith(p) for p in FINE_TUNE_PARTS[side])
        assert torch.equal(exported[k], t.to(exported[k].dtype)) != trained, k

    assert main([*common[:-2], "--checkpoint", str(tmp_path / "f.ckpt"), "--fine-tune", side,
                 "--steps", "1"]) == 2  # a fixed-rate model
    assert "variable-rate" in capsys.readouterr().err
