"""`sgarc metrics` and `sgarc report` on real components: DuckDB over real Parquet parts,
locally and on S3 (moto's server through s3fs), and one real pipeline run on Ray.

Most tests use synthetic parts written with `pipeline.sink.part_bytes` at the pipeline's
layout, with numbers chosen so the summaries can be checked exactly by hand; one part is
written with an older, reduced schema. One test runs the real pipeline (local Ray, the
shipped model, amortized then a few SGA iterations on tiny images) and reads its output.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported: local clusters, no tokens

import argparse
import base64
import io
import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import metrics, report
from jobs.metrics import MetricsError
from pipeline import sink
from pipeline.storage import Storage

SCRIPT_KEY = 'x/<script>alert("x")</script>.png'
NEWER_COLUMNS = ["metadata_bytes", "has_icc", "metadata_dropped", "bitstream_sha256",
                 "previous_rd_loss", "replaced"]


def ts(month: int, minute: int = 0) -> datetime:
    return datetime(2024, month, 1, 0, minute, tzinfo=UTC)


def ok_row(run: str, key: str, *, src: int, out: int, w: int, h: int, psnr: float,
           secs: float, when: datetime, method: str = "amortized", iterations: int = 0,
           **extra) -> dict:
    return {"source_key": key, "source_url": f"file:///photos/{key}", "source_bytes": src,
            "source_version": "1", "source_format": "PNG", "source_mode": "RGB", "width": w,
            "height": h, "metadata_bytes": 0, "has_icc": False,
            "bitstream_key": sink.bitstream_key(key), "bitstream_bytes": out,
            "bitstream_sha256": "0" * 64, "bpp": out * 8 / (w * h), "psnr": psnr,
            "method": method, "iterations": iterations, "encode_seconds": secs,
            "model_id": "msh-small-q4", "quality": 4, "lmbda": 0.01, "device": "cpu",
            "run_id": run, "shard_id": "s", "fingerprint": "f" * 16, "timestamp": when,
            "status": "ok", **extra}


def error_row(run: str, key: str, *, src: int, stage: str, error: str, when: datetime
              ) -> dict:
    return {"source_key": key, "source_url": f"file:///photos/{key}", "source_bytes": src,
            "source_version": "1", "method": "amortized", "iterations": 0, "run_id": run,
            "shard_id": "s", "fingerprint": "f" * 16, "timestamp": when, "status": "error",
            "error_stage": stage, "error": error}


def sga(est_bits: float, a_bpp: float, a_psnr: float, rd: float, a_rd: float) -> dict:
    return {"method": "sga", "iterations": 100, "estimated_bits": est_bits,
            "amortized_bpp": a_bpp, "amortized_psnr": a_psnr, "rd_loss": rd,
            "amortized_rd_loss": a_rd}


def old_part_bytes(rows: list[dict]) -> bytes:
    """A part as an older sgarc wrote it: without the columns added since."""
    table = sink.table_of(rows)
    table = table.drop_columns([c for c in NEWER_COLUMNS if c in table.column_names])
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_dataset(storage: Storage) -> None:
    """Three runs: "old" (January, an old-schema part), "b-amortized" (February, two
    parts, two failures), "a-sga" (March, refined rows, a failure of February fixed)."""
    storage.write_atomic(sink.part_key("old", "p0"), old_part_bytes([
        ok_row("old", "old.png", src=2000, out=1000, w=50, h=40, psnr=28.0, secs=2.0,
               when=ts(1))]))
    storage.write_atomic(sink.part_key("b-amortized", "p1"), sink.part_bytes([
        ok_row("b-amortized", "a.png", src=1000, out=400, w=40, h=40, psnr=30.0, secs=1.0,
               when=ts(2)),
        ok_row("b-amortized", SCRIPT_KEY, src=3000, out=600, w=40, h=30, psnr=26.0,
               secs=3.0, when=ts(2)),
    ]))
    storage.write_atomic(sink.part_key("b-amortized", "p2"), sink.part_bytes([
        error_row("b-amortized", "broken.jpg", src=50, stage="decode",
                  error="cannot identify image file <b>broken</b> & co", when=ts(2)),
        error_row("b-amortized", "flaky.png", src=1000, stage="read",
                  error="ConnectionResetError: reset", when=ts(2, 5)),
    ]))
    storage.write_atomic(sink.part_key("a-sga", "p3"), sink.part_bytes([
        ok_row("a-sga", "a.png", src=1000, out=300, w=40, h=40, psnr=31.0, secs=10.0,
               when=ts(3), **sga(480, 0.4, 30.0, 1.5, 2.0)),
        ok_row("a-sga", "c.png", src=2000, out=700, w=50, h=40, psnr=33.0, secs=20.0,
               when=ts(3), **sga(800, 0.6, 32.5, 0.9, 1.0)),
        ok_row("a-sga", "flaky.png", src=1000, out=200, w=20, h=20, psnr=30.0, secs=30.0,
               when=ts(3, 1), **sga(400, 1.3, 29.0, 3.0, 4.0)),
    ]))


# The summaries, computed by hand (definitions in jobs/metrics.py).
EXPECTED = {
    "old": {"images": 1, "ok": 1, "failures": 0, "bytes_in": 2000, "bytes_out": 1000,
            "savings_pct": 50.0, "mean_bpp": 4.0, "mean_psnr": 28.0, "refined": 0,
            "rd_gain_pct": None, "bpp_saved": None, "psnr_gain_db": None,
            "encode_seconds": 2.0, "mean_encode_seconds": 2.0, "methods": ["amortized"]},
    "b-amortized": {"images": 4, "ok": 2, "failures": 2, "bytes_in": 4000, "bytes_out": 1000,
                    "savings_pct": 75.0, "mean_bpp": 3.0, "mean_psnr": 28.0, "refined": 0,
                    "rd_gain_pct": None, "bpp_saved": None, "psnr_gain_db": None,
                    "encode_seconds": 4.0, "mean_encode_seconds": 2.0,
                    "methods": ["amortized"]},
    # bpp 1.5, 2.8, 4.0; RD gains 25%, 10%, 25%; estimated bpp saved 0.4 - 480/1600,
    # 0.6 - 800/2000, 1.3 - 400/400; PSNR gains 1, 0.5, 1.
    "a-sga": {"images": 3, "ok": 3, "failures": 0, "bytes_in": 4000, "bytes_out": 1200,
              "savings_pct": 70.0, "mean_bpp": 8.3 / 3, "mean_psnr": 94.0 / 3, "refined": 3,
              "rd_gain_pct": 20.0, "bpp_saved": 0.2, "psnr_gain_db": 2.5 / 3,
              "encode_seconds": 60.0, "mean_encode_seconds": 20.0, "methods": ["sga"]},
}
ORDER = ["old", "b-amortized", "a-sga"]  # by first timestamp, not by name


def check_summaries(got: list[dict]) -> None:
    assert [s["run"] for s in got] == ORDER
    for s in got:
        want = EXPECTED[s["run"]]
        assert {k: s[k] for k in want} == {k: pytest.approx(v) if isinstance(v, float) else v
                                          for k, v in want.items()}, s["run"]


@pytest.fixture
def local_out(tmp_path) -> Path:
    out = tmp_path / "archive"
    write_dataset(Storage(str(out)))
    return out


def cli(argv: list[str]) -> int:
    """Like jobs/cli.py: both commands registered on a parser of our own."""
    parser = argparse.ArgumentParser(prog="sgarc")
    sub = parser.add_subparsers(dest="command", required=True)
    metrics.register(sub)
    report.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def test_run_summaries_exact(local_out):
    con = metrics.connect(str(local_out))
    try:
        check_summaries(metrics.run_summaries(con))
        assert metrics.runs(con) == ORDER
        (only,) = metrics.run_summaries(con, run="a-sga")
        assert only["run"] == "a-sga"
        first, last = only["first"], only["last"]
        assert (first, last) == (ts(3), ts(3, 1))
        # `run` (from the folder) agrees with the files' run_id; `part` names the file.
        _, rows = metrics.query(con, "SELECT count(*) FROM metrics WHERE run <> run_id "
                                     "OR part NOT LIKE '%/metrics/run=' || run || '/%'")
        assert rows == [(0,)]
    finally:
        con.close()


def test_parts_without_newer_columns_still_read(local_out, tmp_path):
    con = metrics.connect(str(local_out))
    try:
        _, rows = metrics.query(con, "SELECT run, count(*) FILTER (WHERE metadata_bytes IS NULL),"
                                     " count(*) FILTER (WHERE has_icc IS NULL) FROM metrics "
                                     "WHERE status = 'ok' GROUP BY run ORDER BY run")
        assert rows == [("a-sga", 0, 0), ("b-amortized", 0, 0), ("old", 1, 1)]
    finally:
        con.close()
    # Only old parts: the newer columns are still in the view (all NULL).
    only_old = tmp_path / "only-old"
    Storage(str(only_old)).write_atomic(sink.part_key("old", "p0"), old_part_bytes([
        ok_row("old", "old.png", src=2000, out=1000, w=50, h=40, psnr=28.0, secs=2.0,
               when=ts(1))]))
    con = metrics.connect(str(only_old))
    try:
        _, rows = metrics.query(con, "SELECT metadata_bytes, has_icc, bitstream_sha256 "
                                     "FROM metrics")
        assert rows == [(None, None, None)]
        assert set(sink.SCHEMA.names) | {"run", "part"} == set(
            metrics.query(con, "SELECT * FROM metrics")[0])
        assert metrics.run_summaries(con)[0]["savings_pct"] == pytest.approx(50.0)
    finally:
        con.close()


def test_worst_images_and_failures(local_out):
    con = metrics.connect(str(local_out))
    try:
        worst = metrics.worst_images(con, n=3)
        assert [(r["run"], r["source_key"]) for r in worst] == [
            ("b-amortized", SCRIPT_KEY), ("old", "old.png"), ("a-sga", "flaky.png")]
        by_savings = metrics.worst_images(con, by="savings", n=3)
        assert [(r["source_key"], r["savings_pct"]) for r in by_savings] == [
            ("old.png", 50.0), ("a.png", 60.0), ("c.png", 65.0)]
        assert [r["source_key"] for r in metrics.worst_images(con, run="a-sga", by="bpp")] \
            == ["flaky.png", "c.png", "a.png"]
        with pytest.raises(MetricsError, match="choose one of"):
            metrics.worst_images(con, by="size")
        failed = metrics.failures(con)
        assert [(r["source_key"], r["error_stage"], r["fixed_later"]) for r in failed] == [
            ("flaky.png", "read", True), ("broken.jpg", "decode", False)]
        assert metrics.failures(con, run="a-sga") == []
        assert metrics.count_failures(con) == 2
    finally:
        con.close()


def test_run_filter_and_errors(local_out, tmp_path):
    con = metrics.connect(str(local_out), run="b-amortized")  # reads that run's parts only
    try:
        check_summaries_subset = metrics.run_summaries(con)
        assert [s["run"] for s in check_summaries_subset] == ["b-amortized"]
        assert metrics.query(con, "SELECT count(*) FROM metrics")[1] == [(4,)]
    finally:
        con.close()
    with pytest.raises(MetricsError, match=r"no run nope under .*runs there: a-sga, "
                                           r"b-amortized, old"):
        metrics.connect(str(local_out), run="nope")
    for empty in (tmp_path / "missing", tmp_path):  # no folder; a folder without metrics
        with pytest.raises(MetricsError, match=r"no metrics under .*: run `sgarc run` first"):
            metrics.connect(str(empty))
    con = metrics.connect(str(local_out))
    try:
        with pytest.raises(MetricsError, match="SQL"):
            metrics.query(con, "SELECT no_such_column FROM metrics")
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_tables(local_out, capsys):
    assert cli(["metrics", str(local_out), "--worst", "2"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "started"])
    rows = [line.split()[0] for line in lines[header + 2:header + 5]]
    assert rows == ORDER
    assert "75.0%" in text and "70.0%" in text and "50.0%" in text
    assert "20.00%" in text and "+0.83" in text  # refinement table: a-sga only
    assert "worst 2 by psnr" in text and SCRIPT_KEY in text
    assert "failures: 2, newest 2 shown" not in text and "failures: 2" in text
    assert "cannot identify image file <b>broken</b> & co" in text  # plain text: unescaped
    # Columns line up: each table's rows are as long as its dashes.
    for i, line in enumerate(lines):
        if line and set(line.replace(" ", "")) == {"-"}:
            assert len(lines[i - 1]) <= len(line) + 1


def test_cli_json_sql_and_run(local_out, capsys):
    assert cli(["metrics", str(local_out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["run"] for s in got["runs"]] == ORDER
    assert got["runs"][0]["first"] == "2024-01-01T00:00:00+00:00"
    check_summaries([{**s, "first": None, "last": None} for s in got["runs"]])
    assert got["failures_total"] == 2 and len(got["worst"]) == 6

    assert cli(["metrics", str(local_out), "--run", "a-sga", "--json", "--worst", "1",
                "--by", "bpp"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["run"] for s in got["runs"]] == ["a-sga"]
    assert [r["source_key"] for r in got["worst"]] == ["flaky.png"]

    sql = ("SELECT run, count(*) AS n, sum(bitstream_bytes) AS out, min(timestamp) AS t "
           "FROM metrics GROUP BY run ORDER BY run")
    assert cli(["metrics", str(local_out), "--sql", sql, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["columns"] == ["run", "n", "out", "t"]
    assert got["rows"] == [["a-sga", 3, 1200, "2024-03-01T00:00:00+00:00"],
                           ["b-amortized", 4, 1000, "2024-02-01T00:00:00+00:00"],
                           ["old", 1, 1000, "2024-01-01T00:00:00+00:00"]]

    # --run restricts the view that --sql sees.
    assert cli(["metrics", str(local_out), "--run", "old", "--sql",
                "SELECT run, source_key FROM metrics"]) == 0
    text = capsys.readouterr().out
    assert "old.png" in text and "a.png" not in text and "(1 row)" in text

    with pytest.raises(MetricsError, match="not valid JSON"):
        cli(["metrics", str(local_out), "--storage-options", "{nope"])
    with pytest.raises(MetricsError, match="no metrics under"):
        cli(["metrics", str(local_out / "elsewhere")])


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    from tests.s3server import s3_server

    with s3_server() as server:
        yield server


def test_s3_dataset(s3, local_out, tmp_path, capsys):
    bucket = s3.create_bucket()
    url = f"s3://{bucket}/photo archive [2024]"  # glob characters and a space in the root
    options = s3.storage_options()
    write_dataset(Storage(url, options))

    con = metrics.connect(url, options)
    try:
        check_summaries(metrics.run_summaries(con))
        assert metrics.query(con, "SELECT run FROM metrics WHERE status = 'ok' "
                                  "AND metadata_bytes IS NULL")[1] == [("old",)]
    finally:
        con.close()

    secret = "s3cr3t-never-printed"
    opts = json.dumps(s3.storage_options(secret=secret))  # moto takes any secret
    assert cli(["metrics", url, "--json", "--storage-options", opts]) == 0
    on_s3 = json.loads(capsys.readouterr().out)
    assert cli(["metrics", str(local_out), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert on_s3["runs"] == local["runs"] and on_s3["worst"] == local["worst"]
    assert cli(["metrics", url, "--storage-options", opts, "--run", "a-sga"]) == 0
    assert cli(["report", url, "-o", str(tmp_path / "s3.html"), "--storage-options", opts]) == 0
    out = capsys.readouterr().out
    assert secret not in out and secret not in (tmp_path / "s3.html").read_text()

    with pytest.raises(MetricsError, match="no metrics under"):
        metrics.connect(f"s3://{bucket}/elsewhere", options)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def parse_page(text: str) -> ET.Element:
    assert text.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(text.removeprefix("<!DOCTYPE html>\n"))  # well-formed or raises


def plot_of(figure: ET.Element) -> ET.Element:
    """The SVG document of a report figure (a data: URI in its <img>), parsed strictly."""
    img = figure.find("{http://www.w3.org/1999/xhtml}img")
    head, _, data = img.get("src").partition(",")
    assert head == "data:image/svg+xml;base64"
    return ET.fromstring(base64.b64decode(data))


def test_report_page(local_out, tmp_path, capsys):
    path = tmp_path / "site" / "report.html"
    assert cli(["report", str(local_out), "-o", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {path}"
    text = path.read_text(encoding="utf-8")
    root = parse_page(text)
    ns = {"h": "http://www.w3.org/1999/xhtml", "s": "http://www.w3.org/2000/svg"}

    figures = {f.get("id"): plot_of(f) for f in root.iterfind(".//h:figure", ns)}
    assert set(figures) == {"scatter", "savings", "trend"}

    def groups(svg: ET.Element, prefix: str) -> list[ET.Element]:
        return [g for g in svg.iter() if (g.get("id") or "").startswith(prefix)]

    # Scatter: one marker per ok row of the learned route (6), one group per method (two).
    scatter = groups(figures["scatter"], "points-")
    assert len(scatter) == 2
    assert sum(len(g.findall(".//s:use", ns)) for g in scatter) == 6
    legend = "".join(figures["scatter"].itertext())
    assert "method amortized" in legend and "method sga" in legend
    # Histogram: one bar per bin, and the bins hold all 6 images.
    con = metrics.connect(str(local_out))
    try:
        hist = report.savings_histogram(con)
    finally:
        con.close()
    assert sum(hist["counts"]) == 6
    assert len(groups(figures["savings"], "bar-")) == len(hist["counts"])
    # Trend: three panels, one point per run each.
    trend = groups(figures["trend"], "trend-")
    assert len(trend) == 3 and all(len(g.findall(".//s:use", ns)) == 3 for g in trend)

    # Escaped: no markup from the data, the text reads back intact.
    assert "<script" not in text and "<b>" not in text
    assert "&lt;script&gt;" in text and "&lt;b&gt;broken&lt;/b&gt; &amp; co" in text
    all_text = "".join(root.itertext())
    assert SCRIPT_KEY in all_text and "cannot identify image file <b>broken</b> & co" in all_text
    # Self-contained: nothing fetched (images are data: URIs), no scripts.
    for el in root.iter():
        assert "href" not in el.attrib, (el.tag, el.attrib)
        assert el.get("src", "data:").startswith("data:"), (el.tag, el.attrib)
    assert root.find(".//h:script", ns) is None and root.find(".//h:link", ns) is None
    runs_table = root.find(".//h:table", ns)
    assert [tr.find("h:td", ns).text for tr in runs_table.iterfind("h:tbody/h:tr", ns)] == ORDER


def test_report_is_written_atomically(local_out, tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("previous report")

    def no_rename(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk went away"):
        report.write_report(str(local_out), path)
    assert path.read_text() == "previous report"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "report.html"]  # no temp
    monkeypatch.undo()

    assert report.write_report(str(local_out), path, run="a-sga") == path
    root = parse_page(path.read_text(encoding="utf-8"))
    assert "(run a-sga)" in "".join(root.itertext())
    with pytest.raises(MetricsError, match="no metrics under"):
        report.write_report(str(tmp_path / "nothing"), tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------
# The real pipeline
# ---------------------------------------------------------------------------------------------



def test_real_pipeline_output(tmp_path, local_ray):
    from pipeline.run import RunOptions, run
    from pipeline.settings import EncodeSettings

    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    src.mkdir()
    sizes = {}
    for i, (h, w) in enumerate([(32, 48), (40, 40)]):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([96 + 60 * np.sin(xx / (5 + c) + yy / 7) for c in range(3)], -1)
        rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(src / f"img-{i}.png")
        sizes[f"img-{i}.png"] = (src / f"img-{i}.png").stat().st_size
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    options = RunOptions(progress=False, actors=1)
    first = run(str(src), str(out), EncodeSettings(method="amortized"), options)
    second = run(str(src), str(out), EncodeSettings(method="sga", iterations=3), options)
    assert (first.ok, first.errors, second.ok, second.errors) == (2, 1, 2, 1)

    con = metrics.connect(str(out))
    try:
        amortized, refined = metrics.run_summaries(con)
        worst = metrics.worst_images(con, run=second.run_id)
    finally:
        con.close()
    assert (amortized["run"], refined["run"]) == (first.run_id, second.run_id)
    for s in (amortized, refined):
        assert (s["images"], s["ok"], s["failures"]) == (3, 2, 1)
        assert s["bytes_in"] == sum(sizes.values())
        assert s["bytes_out"] > 0 and s["mean_bpp"] > 0 and s["mean_psnr"] > 0
        assert s["savings_pct"] == pytest.approx(100 * (1 - s["bytes_out"] / s["bytes_in"]))
    assert amortized["methods"] == ["amortized"] and amortized["refined"] == 0
    assert amortized["rd_gain_pct"] is None
    # SGA keeps the best latents it saw, starting from the amortized ones: never worse.
    assert refined["methods"] == ["sga"] and refined["refined"] == 2
    assert refined["rd_gain_pct"] >= 0
    assert refined["bpp_saved"] is not None and refined["psnr_gain_db"] is not None
    assert {r["source_key"] for r in worst} == set(sizes)

    path = report.write_report(str(out), tmp_path / "report.html")
    root = parse_page(path.read_text(encoding="utf-8"))
    # The gallery: both learned images of the newest run, decoded from their bitstreams.
    pairs = root.findall(".//{http://www.w3.org/1999/xhtml}figure[@class='pair']")
    assert sorted("".join(f.itertext()).split(" ")[0] for f in pairs) == sorted(sizes)
    assert all(len(f.findall(".//{http://www.w3.org/1999/xhtml}img")) == 2 for f in pairs)
