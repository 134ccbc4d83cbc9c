"""bench/routes.py runs end to end on tiny models and writes its table and JSON."""

from __future__ import annotations

import json

from PIL import Image

from bench import routes as bench_routes
from tests.conftest import TINY_ID, TINY_VR_ID, smooth_image


def test_routes_bench_prints_a_row_per_model_and_floor(tiny_vr_registry, tmp_path, capsys):
    folder = tmp_path / "val"
    folder.mkdir()
    Image.fromarray(smooth_image(64, 96)).save(folder / "a.jpg", quality=95)
    Image.fromarray(smooth_image(24, 24, seed=2)).save(folder / "b.png")
    out = tmp_path / "routes.json"
    assert bench_routes.main(["--data", str(folder), "--models", f"{TINY_ID},{TINY_VR_ID}",
                              "--floors", "none,60", "--registry", str(tiny_vr_registry),
                              "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count(f"| {TINY_ID} |") == 2 and table.count(f"| {TINY_VR_ID} |") == 2
    report = json.loads(out.read_text())
    assert len(report["records"]) == 2 * 2 * 2
    for r in report["records"]:
        assert r["stored_bytes"] <= r["source_bytes"] + 32
        if r["floor"] == 60:  # out of reach of untrained models: stored bit-exact
            assert r["route"] == ("jpeg-lossless" if r["image"] == "a.jpg" else "original")


def test_rate_points_bench_reads_a_checkpoint_or_a_model(tiny_vr_registry, tmp_path, capsys):
    """bench/rate_points.py: a row per grid point, from a registered model and from a
    training checkpoint (exported to a temporary registry first)."""
    from bench import rate_points
    from codec.train import TrainConfig, train

    data_dir = tmp_path / "val"
    data_dir.mkdir()
    Image.fromarray(smooth_image(96, 96, seed=4)).save(data_dir / "a.png")

    assert rate_points.main([TINY_VR_ID, "--registry", str(tiny_vr_registry), "--data",
                             str(data_dir), "--images", "1", "--crop", "32",
                             "--step", "16"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [int(r.split()[0]) for r in rows] == [0, 16, 32, 48, 64]
    ckpt = tmp_path / "vr.ckpt"
    train(TrainConfig(data=[str(data_dir)], N=8, M=8, lmbdas=(0.002, 0.008), steps=1,
                      batch_size=1, crop=64, checkpoint_every=10), ckpt, log=lambda _: None)
    kept = tmp_path / "kept"
    assert rate_points.main([str(ckpt), "--registry", str(tiny_vr_registry), "--data",
                             str(data_dir), "--images", "1", "--crop", "32", "--step", "32",
                             "--keep-registry", str(kept)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "0"
    from codec.registry import entries
    ids = {e.id for e in entries(kept / "registry.json")}
    assert {"checkpoint", TINY_VR_ID} <= ids  # beside the registry's own models


def test_sga_settings_bench_compares_with_the_default_in_the_same_run(tiny_vr_registry,
                                                                      tmp_path, capsys):
    """bench/sga_settings.py: the default first (its own baseline, +0), then each --try."""
    from bench import sga_settings

    data_dir = tmp_path / "train"
    data_dir.mkdir()
    Image.fromarray(smooth_image(64, 64, seed=5)).save(data_dir / "a.png")
    out = tmp_path / "rows.json"
    assert sga_settings.main(["--model", TINY_VR_ID, "--registry", str(tiny_vr_registry),
                              "--rates", "0,32", "--iterations", "3", "--try", "lr=0.02,t0=5",
                              "--data", str(data_dir), "--limit", "1", "--crop", "64",
                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["rate"], r["settings"]) for r in rows] == [
        (0, {}), (0, {"lr": 0.02, "t0": 5}), (32, {}), (32, {"lr": 0.02, "t0": 5})]
    assert rows[0]["vs_default_points"] == 0 and rows[2]["vs_default_points"] == 0
    assert all(r["loss_reduction_pct"] >= 0 for r in rows)  # the best kept is never worse
    assert "default" in capsys.readouterr().out
