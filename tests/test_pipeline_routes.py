"""Archive guarantees end to end: a job with a quality floor over JPEG and PNG sources, on a
real local Ray with the shipped default model; streams read back through the CLI's decode,
the decode service, the metrics and the report; a refinement pass that must not make
anything worse."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from codec import routes
from codec.bitstream import parse
from codec.images import load_image
from jobs import metrics, report
from jobs.serve import make_app
from pipeline.decode_service import DecodeService, fetch_decode
from pipeline.run import RunOptions, refine, run
from pipeline.settings import EncodeSettings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
skdata = pytest.importorskip("skimage.data")

QUIET = {"progress": False, "actors": 1}


def _encoded(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def sources() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: pixels come back upright, the JPEG byte for byte
    exif[0x0110] = "pipeline test"
    return {
        "2024/astronaut.jpg": _encoded(skdata.astronaut()[40:136, 100:228], "JPEG",
                                       quality=92, exif=exif.tobytes()),
        "2024/coffee.jpeg": _encoded(skdata.coffee()[60:188, 150:310], "JPEG", quality=85,
                                     progressive=True),
        "tiny/one-pixel.png": _encoded(np.array([[[200, 10, 30]]], np.uint8), "PNG"),
        "noise.png": _encoded(np.random.default_rng(0).integers(0, 256, (40, 40, 3),
                                                                 dtype=np.uint8), "PNG"),
        "chelsea.png": _encoded(skdata.chelsea()[40:104, 120:184], "PNG"),
    }


def write(root, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


def rows_of(out, run_id: str) -> dict[str, dict]:
    table = ds.dataset(out / "metrics", format="parquet", partitioning="hive").to_table()
    return {r["source_key"]: r for r in table.to_pylist() if r["run_id"] == run_id}


def test_floor_job_keeps_jpegs_bit_exact_and_nothing_grows(local_ray, tmp_path):
    files = sources()
    src, out = tmp_path / "in", tmp_path / "out"
    write(src, files)
    floor = EncodeSettings(method="amortized", min_psnr=45.0)  # out of the model's reach
    summary = run(str(src), str(out), floor, RunOptions(shard_size=3, **QUIET))
    assert (summary.ok, summary.errors) == (5, 0)
    rows = rows_of(out, summary.run_id)
    for key, row in rows.items():
        source = files[key]
        assert row["min_psnr"] == 45.0 and row["floor_met"] is True and row["psnr"] >= 45.0
        assert row["bitstream_bytes"] <= len(source) + routes.MAX_OVERHEAD
        assert row["learned_bytes"] > 0 and row["learned_psnr"] < 45.0
        assert row["rd_loss"] is None and row["estimated_bits"] is None  # no latents stored
        expected = "jpeg-lossless" if key.endswith((".jpg", ".jpeg")) else "original"
        assert row["route"] == expected, key
        stream = (out / row["bitstream_key"]).read_bytes()
        assert hashlib.sha256(stream).hexdigest() == row["bitstream_sha256"]
        assert parse(stream).header.route == expected
    # `sgarc decode x.sga out.jpg`: the original JPEG, byte for byte
    for key in ("2024/astronaut.jpg", "2024/coffee.jpeg"):
        back = tmp_path / "back.jpg"
        fetch_decode(str(out / rows[key]["bitstream_key"]), back)
        assert back.read_bytes() == files[key]
        assert rows[key]["bitstream_bytes"] < len(files[key])  # the transcode saves
    # the decode service: the original for its own format, the source's pixels otherwise
    service = DecodeService(out, cache_bytes=0)
    assert service.get("2024/astronaut.jpg", "jpeg") == (files["2024/astronaut.jpg"],
                                                         "image/jpeg")
    assert service.get("2024/astronaut.jpg", "jpeg", quality=40)[0] == \
        files["2024/astronaut.jpg"]
    assert service.get("chelsea.png", "png")[0] == files["chelsea.png"]
    for key in ("2024/astronaut.jpg", "chelsea.png", "tiny/one-pixel.png"):
        body, kind = service.get(key, "webp" if key.endswith(".png") else "png")
        decoded = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        if kind == "image/png":  # lossless: the source's upright pixels exactly
            assert np.array_equal(decoded, load_image(files[key]).rgb)
        assert decoded.shape == load_image(files[key]).rgb.shape
    from starlette.testclient import TestClient

    response = TestClient(make_app(service)).get("/images/2024/coffee.jpeg?format=jpeg")
    assert response.status_code == 200 and response.content == files["2024/coffee.jpeg"]
    strip = service.get("2024/coffee.jpeg", "jpeg", strip_metadata=True)[0]
    assert strip != files["2024/coffee.jpeg"]  # re-encoded pixels, no metadata

    # metrics and report: the share of images and bytes per route
    con = metrics.connect(str(out))
    try:
        shares = {r["route"]: r for r in metrics.route_summaries(con)}
        data = report.collect(con)
    finally:
        con.close()
    assert shares["jpeg-lossless"]["images"] == 2 and shares["original"]["images"] == 3
    assert abs(sum(r["image_share"] for r in shares.values()) - 100.0) < 1e-9
    assert abs(sum(r["byte_share"] for r in shares.values()) - 100.0) < 1e-9
    assert shares["jpeg-lossless"]["savings_pct"] > 0
    assert shares["original"]["floor_met"] == 3 and shares["original"]["floor_missed"] == 0
    page = report.render(data, str(out))
    assert 'id="routes"' in page and "jpeg-lossless" in page

    # refinement under the same floor replaces nothing with something worse
    before = {p.name: p.read_bytes() for p in (out / "bitstreams").rglob("*.sga")}
    sga = EncodeSettings(method="sga", iterations=3, min_psnr=45.0)
    refined = refine(str(src), str(out), sga, RunOptions(shard_size=5, **QUIET))
    assert (refined.images, refined.replaced) == (5, 0)
    assert all(r["replaced"] is False for r in rows_of(out, refined.run_id).values())
    assert before == {p.name: p.read_bytes() for p in (out / "bitstreams").rglob("*.sga")}


def test_without_a_floor_streams_never_grow_and_the_codec_wins_where_it_can(local_ray,
                                                                            tmp_path):
    files = sources()
    src, out = tmp_path / "in", tmp_path / "out"
    write(src, files)
    summary = run(str(src), str(out), EncodeSettings(method="amortized"),
                  RunOptions(shard_size=5, **QUIET))
    rows = rows_of(out, summary.run_id)
    assert summary.ok == 5
    for key, row in rows.items():
        assert row["bitstream_bytes"] <= len(files[key]) + routes.MAX_OVERHEAD, key
        assert row["floor_met"] is None and row["min_psnr"] is None
    assert rows["tiny/one-pixel.png"]["route"] == "original"  # was a 151-byte stream
    assert rows["tiny/one-pixel.png"]["bitstream_bytes"] == 69 + routes.ORIGINAL_OVERHEAD
    assert rows["2024/astronaut.jpg"]["route"] == "learned"
    assert rows["2024/astronaut.jpg"]["rd_loss"] is not None


def test_floor_is_in_the_fingerprint_only_when_set():
    plain = EncodeSettings(method="amortized")
    assert EncodeSettings(method="amortized", min_psnr=None).fingerprint() == \
        plain.fingerprint() == "edce9a57b4a5f3bd"
    assert EncodeSettings(method="amortized", min_psnr=38.0).fingerprint() != \
        plain.fingerprint()
    assert "min_psnr" not in plain.resolved()
    assert EncodeSettings(min_psnr=38.0).resolved()["min_psnr"] == 38.0
    with pytest.raises(ValueError, match="min_psnr"):
        EncodeSettings(min_psnr=-1.0).resolved()
