"""`sgarc eval` and the Bjøntegaard measures it reports."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from codec.evaluation import BASELINES, compare
from codec.metrics import bd_psnr, bd_rate, rate_saving
from codec.model import MeanScaleHyperprior
from codec.registry import export_model
from jobs.evaluate import main, register
from tests.conftest import smooth_image


def _curve(rates, slope=6.0, offset=32.0, scale=1.0):
    """A log-linear RD curve: PSNR = offset + slope * log2(bpp / scale)."""
    return [(r, offset + slope * math.log2(r / scale)) for r in rates]


def _concave(rates, scale=1.0):
    """A realistic concave curve: PSNR saturating with rate."""
    return [(r, 20 + 12 * math.log1p(2.0 * r / scale)) for r in rates]


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_rate_of_a_curve_with_ten_percent_less_rate(method):
    ref = _curve([0.1, 0.25, 0.5, 1.0, 2.0])
    same_points = [(0.9 * r, d) for r, d in ref]
    assert bd_rate(same_points, ref, method) == pytest.approx(-10.0, abs=1e-9)
    # sampled elsewhere on the same log-linear curve: still exactly 10% less rate
    other = _curve([0.13, 0.3, 0.7, 1.1, 1.6, 2.4], scale=0.9)
    assert bd_rate(other, ref, method) == pytest.approx(-10.0, abs=0.1)
    assert bd_rate(ref, same_points, method) == pytest.approx(100 / 0.9 - 100, abs=1e-9)
    assert bd_psnr(other, ref, method) == pytest.approx(6.0 * math.log2(1 / 0.9), abs=0.01)


def test_bd_rate_on_a_concave_curve_and_the_two_fits():
    ref = _concave([0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.2, 3.0])
    better = _concave([0.12, 0.3, 0.5, 0.9, 1.3, 2.0, 2.8], scale=0.85)
    assert bd_rate(better, ref) == pytest.approx(-15.0, abs=0.3)
    assert bd_rate(better, ref, "cubic") == pytest.approx(-15.0, abs=1.0)
    assert bd_rate(list(reversed(better)), ref) == bd_rate(better, ref)  # any order


def test_bd_is_undefined_with_few_points_or_no_overlap():
    ref = _curve([0.1, 0.25, 0.5, 1.0, 2.0])
    assert bd_rate(ref[:3], ref) is None  # VCEG-M33 needs 4 points per curve
    assert bd_rate(ref, ref[:3]) is None
    far = _curve([4, 5, 6, 8], offset=60)
    assert bd_rate(far, ref) is None and bd_psnr(_curve([50, 60, 70, 80]), ref) is None
    with pytest.raises(ValueError):
        bd_rate([(0, 30)] * 4, ref)


def test_rate_saving_at_equal_psnr_with_one_point():
    ref = _concave([0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.2, 3.0])
    (point,) = _concave([0.8], scale=0.8)  # 20% less rate than the reference curve
    assert rate_saving(point, ref) == pytest.approx(-20.0, abs=0.3)
    assert rate_saving((0.5, 80.0), ref) is None  # beyond the reference: no extrapolation
    assert rate_saving((0.5, 10.0), ref) is None


def test_compare_reports_sga_gain_through_the_reference_curves():
    ref = _concave([0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.2, 3.0])
    pts = [{"setting": s, "bpp": r, "psnr": d, "seconds": 0.0} for s, (r, d) in enumerate(ref)]
    curves = {
        "webp": {"kind": "classical", "label": "WebP", "points": pts},
        "sgarc-amortized": {"kind": "sgarc", "method": "amortized", "points": [
            {"setting": 4, "bpp": 1.0, "psnr": _concave([1.0])[0][1], "rd_loss": 2.0}]},
        "sgarc-sga-100": {"kind": "sgarc", "method": "sga", "points": [
            {"setting": 4, "bpp": 0.9, "psnr": _concave([1.0])[0][1], "rd_loss": 1.9}]},
    }
    out = compare(curves, "webp")
    assert out["bd_rate"]["sgarc-amortized"] is None  # one point: no BD-rate
    assert out["rate_saving"]["sgarc-amortized"]["webp"][0] == pytest.approx(0.0, abs=1e-9)
    assert out["rate_saving"]["sgarc-sga-100"]["webp"][0] == pytest.approx(-10.0, abs=1e-9)
    (gain,) = out["sga_gain"]["sgarc-sga-100"]["points"]
    assert gain["bpp_change_pct"] == pytest.approx(-10.0)
    assert gain["rd_loss_change_pct"] == pytest.approx(-5.0)
    assert gain["rate_saving_at_equal_psnr_via"]["webp"] == pytest.approx(-10.0, abs=1e-9)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


def test_register_adds_the_eval_command():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "photos", "--sga-iterations", "100,500"])
    assert args.func.__name__ == "cmd_eval" and args.reference == "webp"


def test_eval_writes_json_and_plot(tiny_registry, tmp_path, capsys):
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(72, 96, seed=i)).save(folder / f"{i}.png")
    out, png = tmp_path / "rd.json", tmp_path / "rd.png"
    argv = [str(folder), "--registry", str(tiny_registry), "--sga-iterations", "2",
            "--limit", "2", "--crop", "80x64", "--json", str(out), "--plot", str(png),
            "--quiet"]
    assert main(argv) == 0
    assert "BD-rate vs webp" in capsys.readouterr().out

    report = json.loads(out.read_text())
    for key in ("settings", "machine", "images", "curves", "reference", "bd_rate", "bd_psnr",
                "rate_saving", "sga_gain"):
        assert key in report, key
    assert all(math.isfinite(v) for v in _numbers(report))
    assert [im["name"] for im in report["images"]] == ["0.png", "1.png"]
    assert all((im["width"], im["height"]) == (80, 64) for im in report["images"])
    assert set(report["curves"]) == {"sgarc-amortized", "sgarc-sga-2", *BASELINES}
    for name, curve in report["curves"].items():
        expected = 1 if curve["kind"] == "sgarc" else len(BASELINES[name][2])
        assert len(curve["points"]) == expected, name
        for p in curve["points"]:
            assert len(p["per_image"]) == 2
            assert p["bpp"] == pytest.approx(np.mean([r["bpp"] for r in p["per_image"]]))
            assert all(r["bytes"] * 8 / (80 * 64) == pytest.approx(r["bpp"])
                       for r in p["per_image"])
            assert 0 < p["psnr"] <= 100
    assert report["bd_rate"]["sgarc-amortized"] is None  # one model: one point
    assert report["bd_rate"]["jpeg-420"] is not None  # classical sweeps have a BD-rate
    assert set(report["rate_saving"]["sgarc-sga-2"]) == set(BASELINES)
    assert report["settings"]["avif"] == {"speed": 6, "pixelformat": "yuv444"}

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_eval_errors_are_clear(tiny_registry, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--registry", str(tiny_registry), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--baselines", "gif", "--quiet"]) == 2
    assert "unknown baseline" in capsys.readouterr().err
    assert main([str(tmp_path), "--crop", "big", "--quiet"]) == 2


def test_merge_pools_reports_split_by_quality(tiny_registry, tmp_path, capsys):
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(64, 64, seed=i)).save(folder / f"{i}.png")
    registry = tmp_path / "weights" / "registry.json"  # the tiny model at two qualities
    registry.parent.mkdir()
    shutil.copytree(tiny_registry.parent, registry.parent, dirs_exist_ok=True)
    export_model(MeanScaleHyperprior(N=16, M=24), "tiny-2", quality=2, lmbda=0.02, steps=0,
                 data="untrained (tests)", registry=registry)
    common = [str(folder), "--registry", str(registry), "--quiet", "--sga-iterations", "1,3"]
    a, b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    assert main([*common, "-q", "1", "--baselines", "jpeg-420", "--json", str(a)]) == 0
    assert main([*common, "-q", "2", "--baselines", "none", "--json", str(b)]) == 0
    assert main([str(a), str(b), "--merge", "--reference", "jpeg-420", "--json",
                 str(merged), "--plot", str(tmp_path / "m.png")]) == 0
    report = json.loads(merged.read_text())
    curves = report["curves"]
    assert [p["setting"] for p in curves["sgarc-amortized"]["points"]] == [1, 2]
    assert len(curves["sgarc-sga-1"]["points"]) == len(curves["sgarc-sga-3"]["points"]) == 2
    assert len(curves["jpeg-420"]["points"]) == len(BASELINES["jpeg-420"][2])
    assert report["reference"] == "jpeg-420" and "sgarc-sga-3" in report["sga_gain"]

    other = tmp_path / "other.json"
    assert main([str(folder), "--registry", str(registry), "--quiet", "--limit", "1",
                 "-q", "2", "--sga-iterations", "1,3", "--baselines", "none",
                 "--json", str(other)]) == 0
    capsys.readouterr()
    assert main([str(a), str(other), "--merge"]) == 2
    assert "different images" in capsys.readouterr().err
    assert main([str(a), str(a), "--merge"]) == 2
    assert "more than one report" in capsys.readouterr().err


def test_sga_curves_use_the_products_schedule_unless_paper_is_asked(tiny_registry, tmp_path):
    """--sga-schedule scaled (the default) codes each budget as `sgarc encode --iterations N`
    would; paper codes snapshots of one run of the paper's schedule."""
    from codec.api import Codec
    from codec.evaluation import load_images
    from codec.inference import PAPER, InferenceConfig

    folder = tmp_path / "val"
    folder.mkdir()
    Image.fromarray(smooth_image(64, 64, seed=3)).save(folder / "0.png")
    reports = {}
    for schedule in ("scaled", "paper"):
        out = tmp_path / f"{schedule}.json"
        assert main([str(folder), "--registry", str(tiny_registry), "--quiet", "--baselines",
                     "none", "--sga-iterations", "2,4", "--sga-schedule", schedule,
                     "--json", str(out)]) == 0
        reports[schedule] = json.loads(out.read_text())
    image = load_images([str(folder)])[0]
    codec = Codec(1, registry=tiny_registry)
    for n in (2, 4):
        row = reports["scaled"]["curves"][f"sgarc-sga-{n}"]["points"][0]["per_image"][0]
        assert row["bytes"] == len(codec.encode(image.prepared, InferenceConfig(iterations=n))
                                   .data)
    snapshots = codec.encode_snapshots(image.prepared, replace(PAPER, iterations=4,
                                                               snapshots=(2, 4)))
    for n in (2, 4):
        row = reports["paper"]["curves"][f"sgarc-sga-{n}"]["points"][0]["per_image"][0]
        assert row["bytes"] == len(snapshots[n].data)
    assert reports["paper"]["settings"]["sga"]["lr"] == PAPER.learning_rate
    assert reports["scaled"]["settings"]["sga"]["lr"] == InferenceConfig().learning_rate
