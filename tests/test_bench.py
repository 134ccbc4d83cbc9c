"""The benchmark suite (`python -m bench`) runs end to end and writes well-formed JSON.

Its quickest mode on the tiny untrained model, one thread. Only the shape of the results
is checked, never a timing target. The pipeline section is left out: it starts Ray actor
processes for four pipeline runs (about 40 s on a busy 2-core CPU even at 2 images) and
loads shipped models only; `bench/pipeline_overhead.py` is what it reports.
"""

from __future__ import annotations

import json
import math

import pytest

import bench.__main__ as suite
from tests.conftest import TINY_ID

CODEC_ROWS = {"decode_cpu_ms", "decode_cpu_entropy_share", "encode_cpu_ms", "sga_iteration_ms",
              "sga_images_per_hour", "train_step_ms"}


def test_quick_suite_writes_summary_and_json(tiny_registry, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert suite.main(["--quick", "--device", "cpu", "--skip", "pipeline", "--threads", "1",
                       "--registry", str(tiny_registry), "--model", TINY_ID,
                       "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["sections"] == ["decode", "encode", "sga", "train"]
    assert report["model"]["id"] == TINY_ID
    assert report["machine"]["logical_cpus"] >= 1
    assert report["pipeline_overhead"] is None
    assert set(report["codec_speed"]) == {"cpu"}
    assert report["targets"]["sga_iterations"] == 2000

    rows = {r["key"]: r for r in report["summary"]}
    assert set(rows) == CODEC_ROWS
    for r in rows.values():
        assert math.isfinite(r["measured"]) and r["measured"] > 0, r
        assert r["target"] or r["met"] is None
    for key in CODEC_ROWS - {"decode_cpu_entropy_share"}:
        assert rows[key]["floor"] > 0 and rows[key]["ratio"] > 0, rows[key]
    assert rows["sga_images_per_hour"]["met"] is None  # the target is per H100, not a CPU
    per_image_s = 3600 / rows["sga_images_per_hour"]["measured"]
    assert per_image_s > 2000 * rows["sga_iteration_ms"]["measured"] / 1e3

    cpu = report["codec_speed"]["cpu"]
    assert cpu["peak_gflops"]["fp32"] > 0 and cpu["peak_gflops"]["fp64"] > 0
    keyed = {r["key"]: r for r in cpu["rows"] if r["key"]}
    assert set(keyed) == {"encode", "decode", "decode_entropy", "sga_iteration"}

    variants = {r["variant"] for r in report["train_step"]["rows"]}
    assert {"nchw", "channels_last"} <= variants
    assert report["train_step"]["gflop_per_step"] > 0

    table = capsys.readouterr().out
    for r in rows.values():
        assert r["name"] in table


@pytest.mark.parametrize("argv", [
    ["--only", "decode", "--skip", "decode"],  # nothing left to run
    ["--only", "decdoe"],  # unknown section
    ["--only", "pipeline", "--registry", "elsewhere/registry.json"],  # pipeline: shipped models
])
def test_bad_section_choices_are_refused(argv):
    with pytest.raises(SystemExit):
        suite.parse_args(argv)


def test_compare_checkpoints_measures_a_checkpoint_along_its_grid(tmp_path):
    """bench/compare_checkpoints.py reads a training checkpoint as it is (no export) and
    measures it; a curve's rate against a reference point is read at equal PSNR."""
    import torch
    from PIL import Image

    from bench.compare_checkpoints import point, variable_model, vs_zoo
    from jobs.train import main as train_main
    from tests.conftest import smooth_image

    for i in range(4):
        Image.fromarray(smooth_image(80, 80, seed=i)).save(tmp_path / f"{i}.png")
    ckpt = tmp_path / "vr.ckpt"
    assert train_main(["--data", str(tmp_path), "--N", "8", "--M", "8", "--crop", "64",
                       "--batch-size", "2", "--lmbdas", "0.002,0.008", "--steps", "2",
                       "--checkpoint", str(ckpt), "--quiet"]) == 0
    model, label = variable_model(str(ckpt))
    assert label.endswith("@2") and model.num_rates == 2
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # an untrained run's gains are all 1: make the top point finer
        model.gain[1] *= 8
        model.inverse_gain[1] /= 8
    tables = model.gain_tables()
    low, high = (point(model.materialize(tables, r), x, model.rate_lmbda(r)) for r in (0, 32))
    assert low[0] > 0 and math.isfinite(low[1]) and high[0] > low[0]
    curve = [(0.5, 30.0), (1.0, 33.0), (2.0, 36.0)]
    assert vs_zoo(curve, [(1.1, 33.0)])[0] == pytest.approx(100 / 1.1 - 100)
    assert vs_zoo(curve, [(1.0, 40.0)]) == [None]  # outside the curve's PSNR range
