"""Amortized first, iterative later: refinement runs replace a bitstream only when better."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from pipeline.run import RunOptions, refine, run
from pipeline.settings import EncodeSettings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

QUIET = {"progress": False, "actors": 1}



def rows(out, run_id):
    table = ds.dataset(out / "metrics", format="parquet", partitioning="hive").to_table()
    return [r for r in table.to_pylist() if r["run_id"] == run_id]


def test_refinement_replaces_only_improved_streams_and_is_idempotent(local_ray, tmp_path):
    skimage = pytest.importorskip("skimage")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    photo = skimage.data.astronaut()
    for i in range(3):
        Image.fromarray(np.ascontiguousarray(photo[64 * i:64 * i + 64, 64:128])).save(
            src / f"p{i}.png")
    coverage = run(str(src), str(out), EncodeSettings(method="amortized"),
                   RunOptions(shard_size=2, **QUIET))
    assert coverage.ok == 3
    before = {p.name: p.read_bytes() for p in (out / "bitstreams").iterdir()}

    target = EncodeSettings(method="sga", iterations=12)
    first = refine(str(src), str(out), target, RunOptions(shard_size=2, **QUIET),
                   max_images=2)
    assert (first.mode, first.images, first.ok) == ("refine", 2, 2)
    refined = rows(out, first.run_id)
    for r in refined:
        assert r["method"] == "sga" and r["previous_rd_loss"] is not None
        stream = (out / "bitstreams" / f"{r['source_key']}.sga").read_bytes()
        if r["replaced"]:
            assert r["rd_loss"] < r["previous_rd_loss"]
            assert stream != before[f"{r['source_key']}.sga"]
        else:
            assert r["bitstream_key"] is None
            assert stream == before[f"{r['source_key']}.sga"]
    assert first.replaced == sum(r["replaced"] for r in refined) >= 1

    second = refine(str(src), str(out), target, RunOptions(shard_size=2, **QUIET))
    assert second.images == 1  # the one left out by max_images
    third = refine(str(src), str(out), target, RunOptions(shard_size=2, **QUIET))
    assert third.images == 0  # every image reached the target: nothing to do
    # the amortized rows are still there: metrics keep both runs
    assert len(rows(out, coverage.run_id)) == 3


def test_refinement_ignores_images_never_encoded(local_ray, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(src / "new.png")
    summary = refine(str(src), str(out), EncodeSettings(method="sga", iterations=2),
                     RunOptions(**QUIET))
    assert summary.images == 0 and summary.skipped == 1
