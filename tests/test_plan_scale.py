"""Archive scale (issue 12): plans as Parquet manifests, the done check in DuckDB, metrics
compaction that is safe to kill, streamed listings, S3 Inventory and Parquet key lists.

Real components: local folders and the moto S3 server through s3fs, real Parquet, DuckDB,
and (for the driver's bounded hand-out) real Ray actors on the shared local Ray.
"""

from __future__ import annotations

import gzip
import io
import json
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import metrics
from pipeline import plan as planning
from pipeline import sink
from pipeline.plan import Plan, make_plan, make_refine_plan
from pipeline.storage import ObjectInfo, Storage, StorageNotFound
from tests.test_metrics import old_part_bytes

FP = "f" * 16
SETTINGS = {"model": "m", "method": "sga", "iterations": 100, "quality": 1, "lmbda": 0.01}


def row(key: str, *, run: str, shard: str, size: int = 10, status: str = "ok",
        method: str = "amortized", rd: float | None = 1.0) -> dict:
    return {"source_key": key, "source_url": f"file:///in/{key}", "source_bytes": size,
            "source_version": "v", "fingerprint": FP, "status": status, "run_id": run,
            "shard_id": shard, "model_id": "m", "method": method, "iterations": 0,
            "rd_loss": rd, "bitstream_bytes": 5, "psnr": 30.0, "timestamp": sink.now()}


def finished_run(out: Storage, run: str, shards: int, per_shard: int = 3) -> dict[str, bytes]:
    """A finished run's parts (the first in the old schema) and summary.json; the parts."""
    parts = {}
    for s in range(shards):
        rows = [row(f"{run}/{s}-{i}.png", run=run, shard=f"s{s}",
                    status="error" if i == 2 else "ok") for i in range(per_shard)]
        parts[sink.part_key(run, f"s{s}")] = (old_part_bytes(rows) if s == 0
                                              else sink.part_bytes(rows))
    for key, data in parts.items():
        out.write_atomic(key, data)
    out.write_atomic(planning.summary_key(run), b"{}")
    return parts


def seen(out: Storage) -> tuple[list, int, set]:
    """What every reader sees: the metrics rows (sorted), the done check's skips and the
    committed shards."""
    con = metrics.connect(out.url)
    rows = sorted(con.sql("SELECT run, source_key, status FROM metrics").fetchall())
    con.close()
    listing = [ObjectInfo(k, 10, "v") for _, k, _ in rows]
    plan = make_plan(listing, "file:///in", out, SETTINGS, FP, 4, write=False)
    return rows, plan.skipped, sink.committed_shards(out, "r1")


def test_compaction_keeps_every_row_once_even_when_killed(tmp_path):
    out = Storage(str(tmp_path / "out"))
    parts = finished_run(out, "r1", shards=10)
    finished_run(out, "r2", shards=2)
    before = seen(out)
    assert len(before[0]) == 36 and before[1] == 24 and len(before[2]) == 10

    # Killed after its first compacted file: that file and every part are there.
    assert sink.compact(out, "r1", rows_per_file=12) == (10, 30)
    compacted = sorted(k for k in out.list_keys("metrics/run=r1") if sink.is_compacted(k))
    assert len(compacted) == 3  # whole parts only: 4 + 4 + 2 parts
    for key, data in parts.items():
        out.write_atomic(key, data)
    for key in compacted[1:]:
        out.delete(key)
    assert seen(out) == before

    # Rerun: the leftovers held by the first file go, the rest is merged.
    parts_merged, rows = sink.compact(out, "r1", rows_per_file=1000)
    assert (parts_merged, rows) < (10, 30) and seen(out) == before
    assert all(sink.is_compacted(k) for k in out.list_keys("metrics/run=r1"))
    assert sink.compact(out, "r1") == (0, 0)  # nothing left to do
    table = pq.read_table(tmp_path / "out" / compacted[0])
    assert table.schema.equals(sink.SCHEMA)  # the per-image schema stays

    # `sgarc metrics compact` compacts finished runs only.
    out.write_atomic(sink.part_key("r3", "x"), sink.part_bytes([row("n.png", run="r3",
                                                                    shard="x")]))
    assert [r for r, _, _ in metrics.compact(out.url)] == ["r2"]
    assert out.exists(sink.part_key("r3", "x"))
    with pytest.raises(metrics.MetricsError, match="not finished"):
        metrics.compact(out.url, run="r3")


def test_plans_are_parquet_manifests_read_a_chunk_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "CHUNK_IMAGES", 10)
    out = Storage(str(tmp_path / "out"))
    images = [ObjectInfo(f"{i:03d}.png", 10, "v") for i in range(45)]
    out.write_atomic(sink.part_key("old", "p"), sink.part_bytes(
        [row(f"{i:03d}.png", run="old", shard="p") for i in range(0, 45, 3)]))
    plan = make_plan(reversed(images), "file:///in", out, SETTINGS, FP, 4, "r")
    assert (plan.num_images, plan.skipped, plan.num_shards) == (30, 15, 8)
    sizes = [pq.read_metadata(tmp_path / "out" / k).num_rows for k in plan.manifests]
    assert len(sizes) >= 2 and sum(sizes) == 30  # whole shards, chunks of >= 10 images
    assert all(n >= 10 and n % 4 == 0 for n in sizes[:-1])
    stored = Plan.from_json(out.read_bytes(planning.plan_key("r")))
    shards = list(stored.iter_shards(out))
    assert [len(s.images) for s in shards] == [4] * 7 + [2]
    assert [im.key for s in shards for im in s.images] == [
        im.key for i, im in enumerate(images) if i % 3]
    assert list(stored.shard_sizes(out)) == [(s.id, len(s.images)) for s in shards]
    assert shards[0].id == planning.shard_id(FP, shards[0].images)


def test_plans_from_before_manifests_still_load(tmp_path):
    """plan.json with every shard inline (what runs wrote before): read, resumed as is."""
    out = Storage(str(tmp_path / "out"))
    legacy = {"run_id": "r0", "input_url": "file:///in", "output_url": out.url,
              "fingerprint": FP, "settings": SETTINGS, "skipped": 2, "created": "2026",
              "mode": "encode", "shards": [
                  {"id": "a", "images": [{"key": "x.png", "size": 1, "version": "v"}],
                   "baseline": None, "refused": None},
                  {"id": "b", "images": [{"key": "y.png", "size": 2, "version": "v"}]}]}
    out.write_atomic(planning.plan_key("r0"), json.dumps(legacy).encode())
    plan = planning.unfinished_plan(out, "file:///in", FP)
    assert (plan.run_id, plan.num_images, plan.num_shards, plan.skipped) == ("r0", 2, 2, 2)
    assert [s.id for s in plan.iter_shards(out)] == ["a", "b"]
    assert list(plan.shard_sizes(out)) == [("a", 1), ("b", 1)]


def test_refine_plan_in_duckdb(tmp_path):
    """The latest written encoding of each current image below the target, most RD loss
    first; images a run already refined (or changed since) are left out."""
    out = Storage(str(tmp_path / "out"))
    rows = [row("a.png", run="1", shard="p", rd=1.0), row("b.png", run="1", shard="p", rd=3.0),
            row("c.png", run="1", shard="p", rd=2.0), row("d.png", run="1", shard="p", rd=9.0),
            row("e.png", run="1", shard="p", rd=5.0, size=99),  # changed since
            {**row("c.png", run="2", shard="q", rd=0.5, method="sga"), "iterations": 100}]
    out.write_atomic(sink.part_key("1", "p"), old_part_bytes(rows[:5]))
    out.write_atomic(sink.part_key("2", "q"), sink.part_bytes(rows[5:]))
    images = [ObjectInfo(k, 10, "v") for k in ("a.png", "b.png", "c.png", "d.png", "e.png")]
    plan = make_refine_plan(images, "file:///in", out, SETTINGS, FP, 2, max_images=3)
    (first, second) = list(plan.iter_shards(out))
    assert [im.key for im in first.images + second.images] == ["d.png", "b.png", "a.png"]
    assert first.baseline == {"d.png": 9.0, "b.png": 3.0}
    assert first.stored["d.png"] == {"route": "learned", "bytes": 5, "psnr": 30.0}
    assert (plan.num_images, plan.skipped) == (3, 2)


def test_parquet_key_lists_and_streamed_listing(tmp_path):
    root = tmp_path / "in"
    for key in ("a/1.jpg", "a/b/2.png", "3.JPG", ".hidden/4.jpg", "notes.txt"):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"x" * len(key))
    store = Storage(str(root))
    listed = store.list_images()
    assert sorted(store.iter_images(), key=lambda o: o.key) == listed
    assert [o.key for o in listed] == ["3.JPG", "a/1.jpg", "a/b/2.png"]
    # a key list with sizes and versions: no lookups; without: looked up, gaps refused
    pq.write_table(pa.table({"key": ["a/1.jpg", "3.JPG"], "size": [7, 5],
                             "version": ["v1", "v2"]}), root / "known.parquet")
    assert store.list_manifest("known.parquet") == [ObjectInfo("3.JPG", 5, "v2"),
                                                    ObjectInfo("a/1.jpg", 7, "v1")]
    pq.write_table(pa.table({"key": ["a/b/2.png", "3.JPG"]}), root / "keys.parquet")
    assert store.list_manifest("keys.parquet") == [listed[0], listed[2]]
    pq.write_table(pa.table({"key": ["gone.png"]}), root / "gone.parquet")
    with pytest.raises(StorageNotFound, match="1 missing"):
        store.list_manifest("gone.parquet")


@pytest.fixture(scope="module")
def s3():
    from tests.s3server import s3_server

    with s3_server() as server:
        yield server


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_reports_as_input(s3, fmt):
    """An S3 Inventory report (manifest.json + gzip CSV or Parquet data files) lists what a
    listing does: the same keys, sizes and ETags (so the same images are skipped)."""
    client = s3.client()
    src, dest = s3.create_bucket(), s3.create_bucket()
    keys = ["in/a b/1.jpg", "in/2+x.png", "in/3.txt", "in/.t/4.jpg", "other/5.jpg"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=src, Key=key, Body=b"x" * (i + 1))
    store = Storage(f"s3://{src}/in", s3.storage_options())
    listed = store.list_images()
    assert [o.key for o in listed] == ["2+x.png", "a b/1.jpg"]
    heads = {k: client.head_object(Bucket=src, Key=k) for k in keys}
    rows = [(src, k, heads[k]["ContentLength"], heads[k]["ETag"].strip('"')) for k in keys]
    if fmt == "CSV":
        from urllib.parse import quote_plus

        text = "".join(f'"{b}","{quote_plus(k, safe="/")}","{n}","{e}"\n' for b, k, n, e in rows)
        data, name = gzip.compress(text.encode()), "data/part-0.csv.gz"
    else:
        buf = io.BytesIO()
        pq.write_table(pa.table({"bucket": [r[0] for r in rows], "key": [r[1] for r in rows],
                                 "size": [r[2] for r in rows],
                                 "e_tag": [r[3] for r in rows]}), buf)
        data, name = buf.getvalue(), "data/part-0.parquet"
    client.put_object(Bucket=dest, Key=f"inv/{name}", Body=data)
    manifest = {"sourceBucket": src, "destinationBucket": f"arn:aws:s3:::{dest}",
                "fileFormat": fmt, "fileSchema": "Bucket, Key, Size, ETag",
                "files": [{"key": f"inv/{name}", "size": len(data)}]}
    client.put_object(Bucket=dest, Key="inv/manifest.json", Body=json.dumps(manifest).encode())
    assert store.list_manifest(f"s3://{dest}/inv/manifest.json") == listed
    assert sorted(store.iter_images(), key=lambda o: o.key) == listed  # streamed listing


def test_driver_hands_out_shards_lazily(tmp_path, local_ray):
    """The driver pulls a shard from the manifests only when an actor is free: never more
    than one per actor ahead of the finished ones (images refused at planning keep the
    actors' work trivial)."""
    from pipeline import run as pipeline_run
    from pipeline.run import RunOptions
    from pipeline.settings import EncodeSettings

    src, out = Storage(str(tmp_path / "in")), Storage(str(tmp_path / "out"))
    settings = EncodeSettings(method="amortized")
    images = [ObjectInfo(f"bad\n{i:02d}.png", 1, "v") for i in range(12)]
    plan = make_plan(images, src.url, out, settings.resolved(), settings.fingerprint(), 1)
    counts = pipeline_run._Counts()
    ahead = []

    def pending():
        for shard in plan.iter_shards(out):
            ahead.append(len(ahead) - counts.shards)
            yield shard

    pipeline_run._execute(plan, pending(), plan.num_shards, plan.num_images, src, out,
                          settings, RunOptions(actors=2, progress=False), None, counts)
    assert (counts.shards, counts.errors) == (12, 12)
    assert max(ahead) < 2  # fewer than the 2 actors in flight when the next is pulled
    assert len(sink.committed_shards(out, plan.run_id)) == 12
