"""End-to-end tests of the recompression pipeline on real components (no mocks).

Real Ray (a small local instance shared by the tests, a three-node `cluster_utils.Cluster`,
and a driver of its own in a subprocess), real Parquet read back with pyarrow and DuckDB,
real S3 over HTTP (moto's server on loopback, through s3fs), the shipped default model and
scikit-image's sample photos cropped small. Covers: a mixed archive (odd modes, corrupt,
empty and non-image files) giving exactly one row per input, incremental reruns, S3 in
and out, a multi-node cluster, an actor killed mid-shard, a driver interrupted and resumed,
and deterministic plans.

The machine running these may have only 2 (busy) cores: one local Ray with ``num_cpus=2``,
created on demand and shut down at the end (the cluster test replaces it for a while),
``method="amortized"`` except where SGA matters, and images of at most 128 px.
"""

from __future__ import annotations

import hashlib
import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported: local clusters, no tokens

import io
import json
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from codec.api import decode
from codec.errors import ModelError
from pipeline import sink
from pipeline.plan import Plan, make_plan, plan_key, shard_id, summary_key
from pipeline.run import RunOptions, RunSummary, run
from pipeline.settings import EncodeSettings
from pipeline.storage import ObjectInfo, Storage
from pipeline.worker import CRASH_MARKER_ENV
from tests.conftest import SHIPPED_VR_ID

skdata = pytest.importorskip("skimage.data")

ROOT = Path(__file__).resolve().parents[1]
FAST = EncodeSettings(method="amortized")
# Two one-thread actors: on a busy 2-core machine one actor with two torch threads (the
# default layout) is several times slower than two actors with one thread each.
QUIET = {"progress": False, "actors": 2}
ODD_KEY = "Ferien 2019/Strand ä #1 [a] 100%.png"  # spaces, non-ASCII, URL and glob characters


# Ray: the session's local instance comes from conftest's `local_ray` (started on demand).


def shards_of(plan: Plan, out) -> list:
    """A stored plan's shards, read from its manifests."""
    return list(plan.iter_shards(out if isinstance(out, Storage) else Storage(str(out))))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo(name: str, height: int, width: int, top: int = 0, left: int = 0) -> np.ndarray:
    """A crop of one of scikit-image's sample photos."""
    return np.ascontiguousarray(getattr(skdata, name)()[top:top + height, left:left + width])


def _write(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def mixed_archive() -> tuple[dict[str, bytes], dict[str, dict], dict[str, tuple[str, str]],
                             list[str]]:
    """(files, ok, errors, unlisted) of a messy photo archive.

    ``ok``: key -> expected row fields of images that must encode; ``errors``: key ->
    (error_stage, a fragment of the error); ``unlisted``: keys that are no image inputs.
    """
    astronaut = _photo("astronaut", 96, 128, left=32)
    jpeg = _encoded(Image.fromarray(astronaut), "JPEG", quality=90)
    rgba = np.dstack([_photo("chelsea", 40, 56), np.full((40, 56), 255, np.uint8)])
    rgba[:20, :, 3] = 90  # partial alpha: kept losslessly under the default policy
    gray16 = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50)
    files = {
        "photos/astronaut.jpg": jpeg,
        "photos/coffee.png": _encoded(Image.fromarray(_photo("coffee", 80, 112, 100, 200)), "PNG"),
        "photos/2019/summer/deep/chelsea.JPG":
            _encoded(Image.fromarray(_photo("chelsea", 64, 64, 50, 120)), "JPEG"),
        ODD_KEY: _encoded(Image.fromarray(_photo("astronaut", 24, 40, 200, 200)), "PNG"),
        "modes/gray.png": _encoded(Image.fromarray(_photo("camera", 64, 80)), "PNG"),
        "modes/palette.png":
            _encoded(Image.fromarray(_photo("coffee", 48, 64)).quantize(16), "PNG"),
        "modes/rgba.png": _encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        "modes/cmyk.jpg": _encoded(Image.fromarray(astronaut[:32, :48]).convert("CMYK"), "JPEG"),
        "modes/gray16.png": _encoded(Image.fromarray(gray16), "PNG"),
        "tiny/one-pixel.png": _encoded(Image.fromarray(np.array([[[200, 10, 30]]], np.uint8)),
                                       "PNG"),
        "broken/truncated.jpg": jpeg[: len(jpeg) // 2],
        "broken/not-an-image.png": b"this is text in a file named .png\n" * 8,
        "broken/empty.jpg": b"",
        "notes.txt": b"not an image extension: never listed\n",
        "photos/._astronaut.jpg": b"macOS resource fork junk (hidden): never listed",
    }
    ok = {
        "photos/astronaut.jpg": {"width": 128, "height": 96, "source_mode": "RGB",
                                 "source_format": "JPEG"},
        "photos/coffee.png": {"width": 112, "height": 80, "source_mode": "RGB",
                              "source_format": "PNG"},
        "photos/2019/summer/deep/chelsea.JPG": {"width": 64, "height": 64, "source_mode": "RGB",
                                                "source_format": "JPEG"},
        ODD_KEY: {"width": 40, "height": 24, "source_mode": "RGB", "source_format": "PNG"},
        "modes/gray.png": {"width": 80, "height": 64, "source_mode": "L", "source_format": "PNG"},
        "modes/palette.png": {"width": 64, "height": 48, "source_mode": "P",
                              "source_format": "PNG"},
        "modes/rgba.png": {"width": 56, "height": 40, "source_mode": "RGBA",
                           "source_format": "PNG"},
        "modes/cmyk.jpg": {"width": 48, "height": 32, "source_mode": "CMYK",
                           "source_format": "JPEG"},
        "tiny/one-pixel.png": {"width": 1, "height": 1, "source_mode": "RGB",
                               "source_format": "PNG"},
    }
    errors = {
        "modes/gray16.png": ("decode", "16-bit"),
        "broken/truncated.jpg": ("decode", "truncated"),
        "broken/not-an-image.png": ("decode", "cannot identify image"),
        "broken/empty.jpg": ("decode", "empty"),
    }
    unlisted = ["notes.txt", "photos/._astronaut.jpg"]
    return files, ok, errors, unlisted


def small_photos(n: int, size: int = 48) -> dict[str, bytes]:
    """``n`` distinct small PNG crops of the sample photos, keys sorting in creation order."""
    names = ("astronaut", "coffee", "chelsea")
    out = {}
    for i in range(n):
        arr = _photo(names[i % 3], size, size, top=20 + 9 * i, left=30 + 7 * i)
        out[f"img-{i:02d}.png"] = _encoded(Image.fromarray(arr), "PNG")
    return out


def write_local(root: Path, files: dict[str, bytes]) -> Path:
    for key, data in files.items():
        _write(root, key, data)
    return root


# ---------------------------------------------------------------------------------------------
# Reading results back
# ---------------------------------------------------------------------------------------------


def rows_of(out: Path | str, run_id: str | None = None, filesystem=None) -> list[dict]:
    """Rows of the metrics dataset (hive partitions ``run=``), optionally of one run."""
    dataset = ds.dataset(f"{out}/metrics", format="parquet", partitioning="hive",
                         filesystem=filesystem)
    table = dataset.to_table(filter=(ds.field("run") == run_id) if run_id else None)
    rows = table.to_pylist()
    for r in rows:
        assert r["run"] == r["run_id"], "partition and run_id column disagree"
    return rows


def by_key(rows: list[dict]) -> dict[str, dict]:
    counts = Counter(r["source_key"] for r in rows)
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"more than one row per input in one run: {duplicated}"
    return {r["source_key"]: r for r in rows}


def duck_counts(out: Path) -> dict[tuple[str, str], int]:
    """(run, status) -> rows, by SQL over the Parquet parts, as users query them."""
    con = duckdb.connect()
    try:
        got = con.sql(f"SELECT run, status, count(*) FROM read_parquet('{out}/metrics/*/*.parquet',"
                      " hive_partitioning = true) GROUP BY ALL").fetchall()
    finally:
        con.close()
    return {(r, s): n for r, s, n in got}


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


def assert_bitstream_decodes(data: bytes, row: dict) -> None:
    decoded = decode(data)
    assert decoded.rgb.shape == (row["height"], row["width"], 3), row["source_key"]
    assert row["bitstream_bytes"] == len(data)
    assert row["bitstream_sha256"] == hashlib.sha256(data).hexdigest()
    if row["route"] in (None, "learned"):  # the row names the layout its stream codes
        assert decoded.header.pad_mode == row["layout"] != "replicate"


def check_ok_row(out: Path, row: dict) -> None:
    assert row["status"] == "ok", row
    assert row["error"] is None and row["error_stage"] is None
    assert row["bitstream_key"] == f"bitstreams/{row['source_key']}.sga"
    assert row["bpp"] > 0 and row["psnr"] > 0
    assert_bitstream_decodes((out / row["bitstream_key"]).read_bytes(), row)


def stored_summary(out: Path, run_id: str) -> dict:
    return json.loads((out / summary_key(run_id)).read_text())


# ---------------------------------------------------------------------------------------------
# 1. A mixed archive: one row per input, ok rows decode, error rows explain
# ---------------------------------------------------------------------------------------------


def test_mixed_archive_gives_one_row_per_input(tmp_path, local_ray):
    files, ok, errors, unlisted = mixed_archive()
    src = write_local(tmp_path / "in", files)
    out = tmp_path / "out"
    listed = [o.key for o in Storage(str(src)).list_images()]
    assert sorted(listed) == sorted([*ok, *errors])
    assert not set(unlisted) & set(listed)

    summary = run(str(src), str(out), FAST, RunOptions(shard_size=3, **QUIET))

    n = len(ok) + len(errors)
    assert (summary.images, summary.ok, summary.errors) == (n, len(ok), len(errors))
    assert (summary.skipped, summary.retried_shards, summary.resumed) == (0, 0, False)
    assert summary.shards == -(-n // 3)
    assert summary.output_url == Storage(str(out)).url
    assert stored_summary(out, summary.run_id)["images"] == n
    assert (out / plan_key(summary.run_id)).exists()

    rows = by_key(rows_of(out, summary.run_id))
    assert set(rows) == set(ok) | set(errors)
    for key, expected in ok.items():
        row = rows[key]
        check_ok_row(out, row)
        assert {f: row[f] for f in expected} == expected, key
        assert row["method"] == "amortized" and row["iterations"] == 0
        assert row["source_bytes"] == len(files[key])
        assert row["source_url"] == Storage(str(src)).url_of(key)
    for key, (stage, fragment) in errors.items():
        row = rows[key]
        assert row["status"] == "error", row
        assert row["error_stage"] == stage, row
        assert fragment in row["error"], row["error"]
        assert row["bitstream_key"] is None
        assert not (out / f"bitstreams/{key}.sga").exists()

    # Odd modes come back as what went in: gray stays gray, partial alpha losslessly.
    gray = decode((out / "bitstreams/modes/gray.png.sga").read_bytes())
    assert gray.header.color == "L"
    rgba = decode((out / "bitstreams/modes/rgba.png.sga").read_bytes())
    original_alpha = np.asarray(Image.open(io.BytesIO(files["modes/rgba.png"])))[..., 3]
    assert rgba.alpha is not None and np.array_equal(rgba.alpha, original_alpha)

    # Exactly the shards of the plan, one part each; SQL sees the same counts.
    parts = sorted((out / "metrics" / f"run={summary.run_id}").iterdir())
    assert [p.name for p in parts] == sorted(
        f"shard-{s.id}.parquet"
        for s in shards_of(Plan.from_json((out / plan_key(summary.run_id)).read_bytes()), out))
    assert duck_counts(out) == {(summary.run_id, "ok"): len(ok),
                                (summary.run_id, "error"): len(errors)}
    sga_files = sorted(p.relative_to(out / "bitstreams").as_posix()
                       for p in (out / "bitstreams").rglob("*.sga"))
    assert sga_files == sorted(f"{k}.sga" for k in ok)
    assert temp_files(out) == [] and temp_files(src) == []


# ---------------------------------------------------------------------------------------------
# 2. Idempotent, incremental reruns
# ---------------------------------------------------------------------------------------------


def test_reruns_redo_only_failed_new_and_changed_images(tmp_path, local_ray):
    photos = small_photos(3)
    files = {**photos, "bad/truncated.png": photos["img-00.png"][:200], "bad/empty.jpg": b""}
    failed = {"bad/truncated.png", "bad/empty.jpg"}
    src = write_local(tmp_path / "in", files)
    out = tmp_path / "out"
    options = RunOptions(shard_size=2, **QUIET)

    first = run(str(src), str(out), FAST, options)
    assert (first.images, first.ok, first.errors, first.skipped) == (5, 3, 2, 0)

    # Same settings again: only the failed images are retried; ok images are skipped.
    second = run(str(src), str(out), FAST, options)
    assert second.run_id != first.run_id and not second.resumed
    assert (second.images, second.ok, second.errors, second.skipped) == (2, 0, 2, 3)
    assert set(by_key(rows_of(out, second.run_id))) == failed

    # A new image and one changed image: those two plus the failed ones.
    _write(src, "new/img-new.png", small_photos(4)["img-03.png"])
    changed = small_photos(2, size=40)["img-01.png"]
    assert changed != files["img-01.png"]
    _write(src, "img-01.png", changed)
    third = run(str(src), str(out), FAST, options)
    rows = by_key(rows_of(out, third.run_id))
    assert set(rows) == failed | {"new/img-new.png", "img-01.png"}
    assert (third.images, third.ok, third.errors, third.skipped) == (4, 2, 2, 2)
    check_ok_row(out, rows["img-01.png"])
    assert (rows["img-01.png"]["width"], rows["img-01.png"]["source_bytes"]) == (40, len(changed))
    check_ok_row(out, rows["new/img-new.png"])

    # Other settings are other work: everything is encoded again.
    sga = EncodeSettings(method="sga", iterations=2)
    fourth = run(str(src), str(out), sga, options)
    rows = by_key(rows_of(out, fourth.run_id))
    assert set(rows) == set(files) | {"new/img-new.png"}
    assert (fourth.images, fourth.ok, fourth.errors, fourth.skipped) == (6, 4, 2, 0)
    for row in rows.values():
        assert (row["method"], row["iterations"]) == ("sga", 2)
        if row["status"] == "ok":
            check_ok_row(out, row)
    assert rows["img-00.png"]["fingerprint"] != by_key(rows_of(out, first.run_id))[
        "img-00.png"]["fingerprint"]

    # And with those settings, nothing but the failures is left to do.
    fifth = run(str(src), str(out), sga, options)
    assert (fifth.images, fifth.errors, fifth.skipped) == (2, 2, 4)

    runs = [first, second, third, fourth, fifth]
    counts = duck_counts(out)
    for s in runs:
        assert counts.get((s.run_id, "ok"), 0) == s.ok
        assert counts.get((s.run_id, "error"), 0) == s.errors
    assert sum(counts.values()) == sum(s.images for s in runs)
    assert temp_files(out) == []


# ---------------------------------------------------------------------------------------------
# 3. S3 in and out (moto's server on loopback, through s3fs)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    from tests.s3server import s3_server

    with s3_server() as server:
        yield server


def test_s3_input_and_output(s3, local_ray):
    import s3fs

    options = s3.storage_options()
    src_bucket, out_bucket = s3.create_bucket(), s3.create_bucket()
    photos = small_photos(4, size=40)
    photos[ODD_KEY] = photos.pop("img-03.png")
    files = {**photos, "odd/empty.png": b"", "odd/readme.txt": b"not listed"}
    client = s3.client()
    for key, data in files.items():
        client.put_object(Bucket=src_bucket, Key=f"archive/{key}", Body=data)
    client.put_object(Bucket=src_bucket, Key="archive/folder/", Body=b"")  # directory marker

    input_url, output_url = f"s3://{src_bucket}/archive", f"s3://{out_bucket}/recompressed"
    summary = run(input_url, output_url, FAST, RunOptions(shard_size=2, **QUIET),
                  storage_options=options)
    assert (summary.images, summary.ok, summary.errors, summary.shards) == (5, 4, 1, 3)
    assert summary.output_url == output_url

    fs = s3fs.S3FileSystem(**options)
    out_root = f"{out_bucket}/recompressed"
    rows = by_key(rows_of(out_root, summary.run_id, filesystem=fs))
    assert set(rows) == {*photos, "odd/empty.png"}
    assert rows["odd/empty.png"]["error_stage"] == "decode"
    etags = {o["Key"].removeprefix("archive/"): o["ETag"].strip('"')
             for o in client.list_objects_v2(Bucket=src_bucket)["Contents"]}
    for key in photos:
        row = rows[key]
        assert row["status"] == "ok" and row["source_version"] == etags[key]
        assert row["source_url"] == f"{input_url}/{key}"
        assert_bitstream_decodes(fs.cat_file(f"{out_root}/{row['bitstream_key']}"), row)

    # The same parts through DuckDB, reading S3 via s3fs (no extension download).
    con = duckdb.connect()
    try:
        con.execute("SET autoinstall_known_extensions = false")
        con.register_filesystem(fs)
        got = con.sql(f"SELECT run, status, count(*) FROM read_parquet('s3://{out_root}/metrics/"
                      "*/*.parquet', hive_partitioning = true) GROUP BY ALL").fetchall()
    finally:
        con.close()
    assert sorted(got) == [(summary.run_id, "error", 1), (summary.run_id, "ok", 4)]

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=out_bucket)["Contents"]]
    assert not [k for k in keys if k.endswith(".tmp")]
    assert f"recompressed/{summary_key(summary.run_id)}" in keys

    again = run(input_url, output_url, FAST, RunOptions(shard_size=2, **QUIET),
                storage_options=options)
    assert (again.images, again.skipped) == (1, 4)


# ---------------------------------------------------------------------------------------------
# 5. An actor killed mid-shard
# ---------------------------------------------------------------------------------------------


def test_actor_killed_mid_shard_is_retried(tmp_path, local_ray):
    photos = small_photos(6, size=40)
    src = write_local(tmp_path / "in", photos)
    out = tmp_path / "out"
    flag = tmp_path / "crashed.flag"
    victim = "img-05.png"  # the last image of the third (and last) shard
    options = RunOptions(shard_size=2, max_attempts=2, actor_env={
        CRASH_MARKER_ENV: f"{victim}@{flag}"}, **QUIET)

    summary = run(str(src), str(out), FAST, options)

    assert flag.exists(), "the actor never reached the marked image"
    assert summary.retried_shards >= 1
    assert (summary.images, summary.ok, summary.errors) == (6, 6, 0)
    rows = by_key(rows_of(out, summary.run_id))
    assert set(rows) == set(photos)
    for row in rows.values():
        check_ok_row(out, row)
    crashed = rows[victim]["shard_id"]
    parts = list((out / "metrics").rglob("*.parquet"))
    assert [p.name for p in parts].count(f"shard-{crashed}.parquet") == 1
    assert len(parts) == summary.shards == 3
    assert temp_files(out) == []


def test_shard_failing_every_attempt_gets_error_rows(tmp_path, local_ray):
    """A shard whose task fails on every attempt: its images get "worker" error rows."""
    photos = small_photos(4, size=32)
    src = write_local(tmp_path / "in", photos)
    out = tmp_path / "out"
    # The marker's flag cannot be created (no such folder), so the task raises each time
    # it reaches img-03 instead of crashing the actor once.
    flag = tmp_path / "missing-folder" / "flag"
    options = RunOptions(shard_size=2, max_attempts=2, actor_env={
        CRASH_MARKER_ENV: f"img-03.png@{flag}"}, **QUIET)

    summary = run(str(src), str(out), FAST, options)

    assert (summary.images, summary.ok, summary.errors) == (4, 2, 2)
    assert summary.retried_shards == 1
    rows = by_key(rows_of(out, summary.run_id))
    assert set(rows) == set(photos)
    for key in ("img-00.png", "img-01.png"):
        check_ok_row(out, rows[key])
    for key in ("img-02.png", "img-03.png"):
        row = rows[key]
        assert (row["status"], row["error_stage"]) == ("error", "worker")
        assert "shard failed 2 times" in row["error"] and "FileNotFoundError" in row["error"]
        assert row["source_url"].endswith(key) and row["quality"] is not None
    # The failures are not "done": a run without the fault redoes just those two.
    again = run(str(src), str(out), FAST, RunOptions(shard_size=2, **QUIET))
    assert (again.images, again.ok, again.skipped) == (2, 2, 2)


# ---------------------------------------------------------------------------------------------
# 6. The driver interrupted (Ctrl-C), then started again: the run resumes
# ---------------------------------------------------------------------------------------------

DRIVER = """
import os, sys
os.environ["RAY_AUTH_MODE"] = "disabled"
from pipeline.run import RunOptions, run
from pipeline.settings import EncodeSettings
s = run(sys.argv[1], sys.argv[2], EncodeSettings(method="sga", iterations=int(sys.argv[3])),
        RunOptions(shard_size=1, actors=2, progress=False))
print("finished", s.run_id, flush=True)
"""
ITERATIONS = 12  # slows each one-image shard to about a second on a busy CPU


def test_interrupted_driver_resumes_its_run(tmp_path, local_ray):
    photos = small_photos(8)
    src = write_local(tmp_path / "in", photos)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    log = tmp_path / "driver.log"
    with log.open("wb") as sink_file:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(src), str(out),
                                 str(ITERATIONS)], cwd=ROOT, env=env, stdout=sink_file,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not list(out.glob("metrics/run=*/shard-*.parquet")):
                assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no Parquet part within 180 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    run_ids = [p.name.removeprefix("run=") for p in (out / "metrics").iterdir()]
    assert len(run_ids) == 1
    run_id = run_ids[0]
    interrupted = not (out / summary_key(run_id)).exists()
    if interrupted:
        assert rc != 0, log.read_text()[-3000:]
        assert "KeyboardInterrupt" in log.read_text()
        done_before = len(list((out / "metrics" / f"run={run_id}").glob("*.parquet")))
        assert 1 <= done_before <= len(photos)
    else:  # the run beat the signal: the invariants below must hold all the same
        warnings.warn("the driver finished before SIGINT; resume was not exercised",
                      stacklevel=1)

    settings = EncodeSettings(method="sga", iterations=ITERATIONS)
    summary = run(str(src), str(out), settings, RunOptions(shard_size=1, **QUIET))

    if interrupted:  # what was committed before the signal counts as skipped
        assert summary.resumed and summary.run_id == run_id
        assert (summary.images + summary.skipped, summary.ok) == (8, summary.images)
        assert summary.skipped >= done_before and summary.shards == summary.images
    else:
        assert (summary.images, summary.skipped) == (0, 8)
    rows = by_key(rows_of(out, run_id))
    assert set(rows) == set(photos)
    for row in rows.values():
        check_ok_row(out, row)
        assert (row["method"], row["iterations"]) == ("sga", ITERATIONS)
    assert len(list((out / "metrics" / f"run={run_id}").glob("*.parquet"))) == 8
    assert duck_counts(out) == {(run_id, "ok"): 8}


# ---------------------------------------------------------------------------------------------
# 7. Plans are deterministic
# ---------------------------------------------------------------------------------------------


def test_plan_shard_ids_are_deterministic(tmp_path):
    images = [ObjectInfo(f"d/{i:02d}.jpg", 1000 + i, f"v{i}") for i in range(7)]
    output = Storage(str(tmp_path / "out"))
    amortized = EncodeSettings(method="amortized")
    sga = EncodeSettings(method="sga", iterations=3)

    def plan(settings: EncodeSettings, items=images, shard_size=3) -> list:
        return shards_of(make_plan(items, "file:///in", output, settings.resolved(),
                                   settings.fingerprint(), shard_size), output)

    a, b = plan(amortized), plan(amortized, list(reversed(images)))
    ids = [s.id for s in a]
    assert ids == [s.id for s in b] and len(set(ids)) == 3
    assert [[im.key for im in s.images] for s in a] == [
        [im.key for im in images[i:i + 3]] for i in range(0, 7, 3)]
    assert ids[0] == shard_id(amortized.fingerprint(), images[:3])
    assert amortized.fingerprint() == EncodeSettings(method="amortized").fingerprint()

    other = plan(sga)
    assert sga.fingerprint() != amortized.fingerprint()
    assert not {s.id for s in other} & set(ids)
    assert plan(EncodeSettings(method="sga", iterations=4))[0].id != other[0].id

    changed = [*images[:3], ObjectInfo(images[3].key, images[3].size, "v-new"), *images[4:]]
    ids_changed = [s.id for s in plan(amortized, changed)]
    assert ids_changed[0] == ids[0] and ids_changed[1] != ids[1] and ids_changed[2] == ids[2]

    stored = make_plan(images, "file:///in", output, amortized.resolved(),
                       amortized.fingerprint(), 3)
    again = Plan.from_json(stored.to_json())
    assert again == stored and again.manifests and shards_of(again, output) == a
    assert (again.num_images, again.num_shards) == (7, 3)
    with pytest.raises(ValueError):
        plan(amortized, shard_size=0)


def test_plan_skips_images_done_with_the_same_fingerprint(tmp_path):
    images = [ObjectInfo(f"{i}.png", 10 + i, "v") for i in range(4)]
    output = Storage(str(tmp_path / "out"))
    settings = EncodeSettings(method="amortized")
    fp = settings.fingerprint()
    rows = [{"source_key": "0.png", "source_bytes": 10, "source_version": "v",
             "fingerprint": fp, "status": "ok"},
            {"source_key": "1.png", "source_bytes": 11, "source_version": "v",
             "fingerprint": fp, "status": "error"},
            {"source_key": "2.png", "source_bytes": 99, "source_version": "v",
             "fingerprint": fp, "status": "ok"},  # the source changed since
            {"source_key": "3.png", "source_bytes": 13, "source_version": "v",
             "fingerprint": "another", "status": "ok"}]
    output.write_atomic(sink.part_key("old", "x"), sink.part_bytes(rows))
    plan = make_plan(images, "file:///in", output, settings.resolved(), fp, 2)
    assert plan.skipped == 1
    assert [im.key for s in shards_of(plan, output) for im in s.images] == [
        "1.png", "2.png", "3.png"]
    table = pq.read_table(io.BytesIO(output.read_bytes(sink.part_key("old", "x"))))
    assert table.schema.equals(sink.SCHEMA)  # parts always carry the full schema


# What these specs' fingerprints were while the zoo was the default (msh-small-q4 for q4 and
# for no level; computed before the switch to msh-vr5, 2026-12-06).
ZOO_ERA_FINGERPRINTS = {(4, "amortized"): "482e408a3cc34686", (None, "amortized"):
                        "482e408a3cc34686", (2, "sga"): "8aecccac6d023043",
                        (None, "sga"): "7af51ee93667b2de"}


@pytest.mark.parametrize(("quality", "method"), list(ZOO_ERA_FINGERPRINTS))
def test_a_new_default_model_does_not_reencode_an_archive(tmp_path, quality, method):
    """A spec naming a quality level (or none) resolves to the new default now; what its
    runs encoded with the superseded zoo level stays done (DESIGN.md decision 5), while a
    spec that names the new model re-encodes."""
    settings = EncodeSettings(quality=quality, method=method)
    old = ZOO_ERA_FINGERPRINTS[(quality, method)]
    assert settings.fingerprint() != old and old in settings.superseded_fingerprints()
    named = EncodeSettings(model=SHIPPED_VR_ID, method=method)
    assert old not in named.superseded_fingerprints()  # only its own older layout's
    images = [ObjectInfo(f"{i}.png", 10 + i, "v") for i in range(3)]
    output = Storage(str(tmp_path / "out"))
    output.write_atomic(sink.part_key("old", "x"), sink.part_bytes([
        {"source_key": "0.png", "source_bytes": 10, "source_version": "v",
         "fingerprint": old, "status": "ok"}]))
    plan = make_plan(images, "file:///in", output, settings.resolved(), settings.fingerprint(),
                     2, also_done=settings.superseded_fingerprints())
    assert plan.skipped == 1 and plan.num_images == 2
    again = make_plan(images, "file:///in", output, named.resolved(), named.fingerprint(), 2,
                      also_done=named.superseded_fingerprints())
    assert again.skipped == 0


def test_empty_input_and_named_runs_need_no_actors(tmp_path):
    """Nothing to do: no Ray at all, yet a plan and a summary are stored."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_local(src, {"readme.txt": b"no images here"})
    was_up = ray.is_initialized()
    summary = run(str(src), str(out), FAST, RunOptions(run_id="nightly-1", **QUIET))
    assert ray.is_initialized() == was_up
    assert (summary.run_id, summary.images, summary.shards, summary.resumed) == (
        "nightly-1", 0, 0, False)
    assert stored_summary(out, "nightly-1")["images"] == 0
    # The same run id names the same run; other settings under it are refused.
    again = run(str(src), str(out), FAST, RunOptions(run_id="nightly-1", **QUIET))
    assert (again.run_id, again.resumed) == ("nightly-1", True)
    with pytest.raises(ValueError, match="other settings"):
        run(str(src), str(out), EncodeSettings(method="sga", iterations=2),
            RunOptions(run_id="nightly-1", **QUIET))


# ---------------------------------------------------------------------------------------------
# 8. Names at the filesystem's limit, keys the decode service could not take, resumed counts
# ---------------------------------------------------------------------------------------------

LONGEST = "n" * 251 + ".png"  # 255 bytes: the longest name a local disk allows
AT_LIMIT = "m" * 247 + ".png"  # 251 bytes: "<name>.sga" is exactly 255, kept as it is


def check_long_row(data: bytes, row: dict) -> None:
    """An ok row of a long name: its stream under the shortened name, decodable."""
    assert row["status"] == "ok", row
    assert row["bitstream_key"] == sink.bitstream_key(row["source_key"])
    assert len(row["bitstream_key"].rsplit("/", 1)[1].encode()) <= 255
    assert_bitstream_decodes(data, row)


def test_longest_names_archive_and_unservable_keys_are_refused(tmp_path, local_ray):
    from pipeline.decode_service import DecodeService

    photos = small_photos(3, size=32)
    refused = {"line\nbreak.png": "control character", "tab\there.png": "control character",
               "back\\slash.png": "backslash", "caf\udce9.png": "UTF-8"}
    files = {f"long/{LONGEST}": photos["img-00.png"], f"long/{AT_LIMIT}": photos["img-01.png"],
             **dict.fromkeys(refused, photos["img-02.png"])}
    src = write_local(tmp_path / "in", files)
    out = tmp_path / "out"

    summary = run(str(src), str(out), FAST, RunOptions(shard_size=2, **QUIET))

    assert (summary.images, summary.ok, summary.errors) == (6, 2, 4)
    rows = by_key(rows_of(out, summary.run_id))
    check_long_row((out / rows[f"long/{LONGEST}"]["bitstream_key"]).read_bytes(),
                   rows[f"long/{LONGEST}"])
    assert rows[f"long/{LONGEST}"]["bitstream_key"] != f"bitstreams/long/{LONGEST}.sga"
    check_ok_row(out, rows[f"long/{AT_LIMIT}"])  # the plain name still fits
    for key, reason in refused.items():
        row = rows[key.replace("\udce9", "\ufffd")]  # Parquet holds UTF-8 text
        assert (row["status"], row["error_stage"]) == ("error", "plan"), row
        assert "refused at planning" in row["error"] and reason in row["error"]
        assert row["width"] is None and row["bitstream_key"] is None  # never read
    assert temp_files(out) == []

    service = DecodeService(str(out), cache_bytes=0)  # the service finds what was written
    body, _ = service.get(f"long/{LONGEST}")
    assert Image.open(io.BytesIO(body)).size == (32, 32)

    again = run(str(src), str(out), FAST, RunOptions(shard_size=2, **QUIET))
    assert (again.images, again.errors, again.skipped) == (4, 4, 2)  # refused ones retried


def test_longest_name_on_s3(s3, local_ray):
    import s3fs

    from pipeline.decode_service import DecodeService

    options = s3.storage_options()
    src_bucket, out_bucket = s3.create_bucket(), s3.create_bucket()
    client = s3.client()
    key = f"long/{LONGEST}"
    client.put_object(Bucket=src_bucket, Key=f"in/{key}", Body=small_photos(1)["img-00.png"])
    output_url = f"s3://{out_bucket}/out"
    summary = run(f"s3://{src_bucket}/in", output_url, FAST,
                  RunOptions(shard_size=2, **QUIET), storage_options=options)
    assert (summary.images, summary.ok) == (1, 1)
    fs = s3fs.S3FileSystem(**options)
    (row,) = rows_of(f"{out_bucket}/out", summary.run_id, filesystem=fs)
    check_long_row(fs.cat_file(f"{out_bucket}/out/{row['bitstream_key']}"), row)
    body, _ = DecodeService(output_url, options, cache_bytes=0).get(key)
    assert Image.open(io.BytesIO(body)).size == (48, 48)


def test_resumed_run_counts_the_work_done_before_as_skipped(tmp_path, local_ray):
    """A run interrupted after one of its three shards: the resumed call reports 2 images
    and 1 skipped (not 3 images and 0 skipped), so images + skipped is what was asked."""
    from pipeline.worker import ShardEncoder

    src = write_local(tmp_path / "in", small_photos(3, size=32))
    out = tmp_path / "out"
    source, output = Storage(str(src)), Storage(str(out))
    plan = make_plan(source.list_images(), source.url, output, FAST.resolved(),
                     FAST.fingerprint(), 1)
    encoder = ShardEncoder(source.url, output.url, None, FAST, plan.fingerprint, device="cpu")
    encoder.process(shards_of(plan, output)[0], plan.run_id)  # committed before the "interruption"

    summary = run(str(src), str(out), FAST, RunOptions(shard_size=1, **QUIET))

    assert summary.resumed and summary.run_id == plan.run_id
    assert (summary.images, summary.ok, summary.skipped, summary.shards) == (2, 2, 1, 2)
    assert "2 images (2 ok, 0 errors), 1 skipped, 2 shards" in summary.line()
    assert stored_summary(out, plan.run_id)["skipped"] == 1
    assert len(rows_of(out, plan.run_id)) == 3


# ---------------------------------------------------------------------------------------------
# 4. A three-node Ray cluster (last: it replaces the session's local Ray while it runs)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def three_node_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the next test that needs it starts the local one again
    small = {"object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False, **small})
    try:
        cluster.add_node(num_cpus=1, **small)
        cluster.add_node(num_cpus=1, **small)
        cluster.wait_for_nodes(timeout=120)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_three_node_cluster(tmp_path, three_node_cluster):
    """Actors spread over the nodes, shards streamed from the plan's manifests."""
    photos = small_photos(6, size=40)
    src = write_local(tmp_path / "in", photos)
    out = tmp_path / "out"

    # The driver connects to the cluster itself (and leaves it afterwards).
    summary: RunSummary = run(str(src), str(out), FAST, RunOptions(
        address=three_node_cluster.address, actors=3, shard_size=1, progress=False))
    assert not ray.is_initialized()
    assert (summary.images, summary.ok, summary.shards, summary.retried_shards) == (6, 6, 6, 0)
    rows = by_key(rows_of(out, summary.run_id))
    assert set(rows) == set(photos)
    for row in rows.values():
        check_ok_row(out, row)
    assert len({r["shard_id"] for r in rows.values()}) == 6

    # The three encoder actors were placed, one per node (the driver asks for SPREAD).
    # Without a dashboard the state API is unavailable; the GCS actor table still says where.
    ray.init(address=three_node_cluster.address, log_to_driver=False, configure_logging=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    actors = [a for a in ray._private.state.actors().values()
              if a["ActorClassName"] == "EncoderActor"]
    assert len(actors) == 3, actors
    assert len({a["Address"]["NodeID"] for a in actors}) == 3


def test_per_image_psnr_target(tmp_path, local_ray):
    """[encode] target_psnr: each image coded at its own rate point of the variable-rate
    model, the target and what was reached in its row; a rerun skips them."""
    photos = small_photos(3)
    src = write_local(tmp_path / "in", photos)
    out = tmp_path / "out"
    settings = EncodeSettings(model=SHIPPED_VR_ID, method="amortized", target_psnr=30.0)
    summary = run(str(src), str(out), settings, RunOptions(shard_size=2, **QUIET))
    assert (summary.ok, summary.errors) == (3, 0)
    rows = by_key(rows_of(out, summary.run_id))
    for row in rows.values():
        check_ok_row(out, row)
        assert row["target"] == "psnr" and row["target_value"] == 30.0
        assert row["target_met"] is True and row["psnr"] >= 30.0
        assert row["rate"] is not None and row["model_id"] == SHIPPED_VR_ID
    assert len({row["rate"] for row in rows.values()}) > 1  # found per image
    again = run(str(src), str(out), settings, RunOptions(shard_size=2, **QUIET))
    assert again.skipped == 3
    # quality levels name rate points of the variable-rate default, so a target applies
    assert EncodeSettings(quality=4, target_psnr=30.0).resolved()["model"] == SHIPPED_VR_ID
    with pytest.raises(ModelError, match=f"decode-only.*{SHIPPED_VR_ID}"):  # the old zoo
        EncodeSettings(model="msh-small-q4", target_psnr=30.0).fingerprint()


# The default's fingerprints in the replicate layout (msh-vr5, before the tight layout).
REPLICATE_ERA_FINGERPRINTS = {"amortized": "4018fa69b3d03205", "sga": "c684d45ada4c3deb"}
# ... and in the tight layout, until msh-vr6 became the default (2026-12-06, later).
VR5_TIGHT_ERA_FINGERPRINTS = {"amortized": "d78fb20ee093d8b2", "sga": "78346aece2863fd5"}


def test_fingerprints_of_default_runs_did_not_change():
    """Adding options must not make existing archives redo their work: the default's
    fingerprints stay (msh-vr6's since it became the default), and those of every earlier
    default (msh-vr5 in both layouts, the zoo) count as done."""
    assert EncodeSettings(method="amortized").fingerprint() == "edce9a57b4a5f3bd"
    assert EncodeSettings().fingerprint() == "30a21418d7698bfd"
    for method in ("amortized", "sga"):
        done = EncodeSettings(method=method).superseded_fingerprints()
        assert REPLICATE_ERA_FINGERPRINTS[method] in done
        assert VR5_TIGHT_ERA_FINGERPRINTS[method] in done
        assert ZOO_ERA_FINGERPRINTS[(None, method)] in done
        named = EncodeSettings(method=method, model=SHIPPED_VR_ID).superseded_fingerprints()
        assert len(named) == 1 and VR5_TIGHT_ERA_FINGERPRINTS[method] not in named  # chosen


def test_dry_run_counts_without_running_or_writing(tmp_path, local_ray):
    """--dry-run plans and counts (to encode, skipped, shards) and writes nothing: no plan,
    no bitstream, no metrics; a real run afterwards does what it said."""
    photos = small_photos(3)
    src = write_local(tmp_path / "in", photos)
    out = tmp_path / "out"
    options = RunOptions(shard_size=2, **QUIET)
    first = run(str(src), str(out), FAST, RunOptions(shard_size=2, dry_run=True, **QUIET))
    assert first.dry_run and (first.images, first.skipped, first.shards) == (3, 0, 2)
    assert "would encode 3 images in 2 shards" in first.line()
    assert not out.exists() or not any(out.rglob("*"))
    done = run(str(src), str(out), FAST, options)
    assert done.ok == 3
    write_local(src, {"new.png": small_photos(4)["img-03.png"]})
    again = run(str(src), str(out), FAST, RunOptions(shard_size=2, dry_run=True, **QUIET))
    assert (again.images, again.skipped, again.shards) == (1, 3, 1)
    runs = {p.name for p in (out / "metrics").iterdir()}
    assert runs == {f"run={done.run_id}"}
