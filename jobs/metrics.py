"""`sgarc metrics`: SQL over a run's Parquet metrics with DuckDB, local or on object stores.

    con = connect("archive/")                                     # or s3://bucket/archive
    run_summaries(con)                                            # one dict per run
    worst_images(con, by="psnr", n=10); failures(con)
    query(con, "SELECT method, avg(bpp) FROM metrics WHERE status = 'ok' GROUP BY ALL")

``metrics`` is every row of the run's Parquet files (each counted once, before and after
compaction), read by column name; docs/pipeline.md ("Summaries: `sgarc metrics`") says how
they are read, locally and on object stores, and defines the summaries' fields.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import duckdb

from codec.errors import SgarcError
from jobs.options import STORAGE_OPTIONS_HELP
from jobs.options import parse_storage_options as _parse_storage_options
from pipeline import sink
from pipeline.storage import Storage, StorageError, redact_url

WORST_BY = ("psnr", "bpp", "savings")


class MetricsError(SgarcError):
    """No metrics where asked, an unknown run, an unreadable part, an SQL error."""


# ---------------------------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------------------------


def display_url(url: str) -> str:
    """``url`` without user info (``s3://key:secret@bucket`` -> ``s3://***@bucket``)."""
    return redact_url(str(url))


def connect(output_url: str, storage_options: dict | None = None, *,
            run: str | None = None, cache: bool | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with ``metrics`` over the output's parts.

    ``run`` limits ``metrics`` to that run's parts (only they are read). ``cache``: read the
    parts once into an in-memory table instead of a view that reads them at each query;
    the default caches on object stores, where every query would otherwise open every part
    again (a round trip each), and reads local parts lazily. The files are those readers
    see (``pipeline.sink.metric_files``: compacted files, and the parts no compacted file
    holds), listed once and read by DuckDB's own ``read_parquet([...], union_by_name)``.
    Raises :class:`MetricsError` when there are no parts (or none of ``run``) or they
    cannot be read.
    """
    shown = display_url(output_url)
    try:
        storage = Storage(output_url, storage_options)
    except (ValueError, ImportError) as exc:
        raise MetricsError(f"cannot open {shown}: {exc}") from None
    if run is not None and (not run or "/" in run or run in (".", "..")):
        raise MetricsError(f"not a run id: {run!r}")
    con = sink.duckdb_connection(storage)
    try:
        try:
            files = sink.metric_files(storage, run)
        except (StorageError, duckdb.Error) as exc:
            raise MetricsError(f"cannot read the metrics under {shown}: {exc}") from None
        if not files:
            if run is None:
                raise MetricsError(f"no metrics under {shown}: run `sgarc run` first")
            raise MetricsError(_unknown_run(storage, run, shown))
        if cache is None:
            cache = storage.protocol != "file"
        try:
            rel = sink.read_metrics(con, storage, files)
            if cache:
                rel.create("metrics")
            else:
                rel.create_view("metrics")
        except duckdb.Error as exc:
            raise MetricsError(f"cannot read the metrics under {shown}: {exc}") from None
    except BaseException:
        con.close()
        raise
    return con


def _unknown_run(storage: Storage, run: str, shown: str) -> str:
    try:
        keys = storage.list_keys("metrics", ".parquet")
    except StorageError:
        keys = []
    runs = sorted({m.group(1) for k in keys if (m := re.match(r"metrics/run=([^/]+)/", k))})
    if not runs:
        return f"no metrics under {shown}: run `sgarc run` first"
    listed = ", ".join(runs[-10:]) + (f" (and {len(runs) - 10} earlier)" if len(runs) > 10 else "")
    return f"no run {run} under {shown}; runs there: {listed}"


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None
          ) -> list[dict]:
    # Through Arrow: timestamps with time zone come back as datetimes without pytz.
    return con.sql(sql, params=params).to_arrow_table().to_pylist()


_SUMMARY_SQL = """
WITH m AS (SELECT *, status = 'ok' AS is_ok,
                  status = 'ok' AND iterations > 0 AND amortized_rd_loss > 0 AS is_refined
           FROM metrics WHERE $run IS NULL OR run = $run)
SELECT run,
       min(timestamp) AS first,
       max(timestamp) AS last,
       count(*) AS images,
       count(*) FILTER (WHERE is_ok) AS ok,
       count(*) FILTER (WHERE NOT is_ok OR is_ok IS NULL) AS failures,
       CAST(coalesce(sum(source_bytes) FILTER (WHERE is_ok), 0) AS BIGINT) AS bytes_in,
       CAST(coalesce(sum(bitstream_bytes) FILTER (WHERE is_ok), 0) AS BIGINT) AS bytes_out,
       avg(bpp) FILTER (WHERE is_ok) AS mean_bpp,
       avg(psnr) FILTER (WHERE is_ok AND coalesce(route, 'learned') = 'learned')
           AS mean_psnr,
       count(*) FILTER (WHERE is_refined) AS refined,
       100 * avg((amortized_rd_loss - rd_loss) / amortized_rd_loss) FILTER (WHERE is_refined)
           AS rd_gain_pct,
       avg(amortized_bpp - estimated_bits / (CAST(width AS DOUBLE) * height))
           FILTER (WHERE is_refined AND width > 0 AND height > 0) AS bpp_saved,
       avg(psnr - amortized_psnr) FILTER (WHERE is_refined) AS psnr_gain_db,
       sum(encode_seconds) FILTER (WHERE is_ok) AS encode_seconds,
       avg(encode_seconds) FILTER (WHERE is_ok) AS mean_encode_seconds,
       list_sort(list(DISTINCT method) FILTER (WHERE method IS NOT NULL)) AS methods
FROM m GROUP BY run ORDER BY first, run
"""


def run_summaries(con: duckdb.DuckDBPyConnection, run: str | None = None) -> list[dict]:
    """One dict per run, oldest first (fields: docs/pipeline.md, "Summaries")."""
    rows = _rows(con, _SUMMARY_SQL, {"run": run})
    keys = ("run", "first", "last", "images", "ok", "failures", "bytes_in", "bytes_out",
            "savings_pct", "mean_bpp", "mean_psnr", "refined", "rd_gain_pct", "bpp_saved",
            "psnr_gain_db", "encode_seconds", "mean_encode_seconds", "methods")
    out = []
    for r in rows:
        r["savings_pct"] = (100.0 * (1.0 - r["bytes_out"] / r["bytes_in"])
                            if r["bytes_in"] else None)
        r["methods"] = r["methods"] or []
        out.append({k: r[k] for k in keys})
    return out


_ROUTES_SQL = """
SELECT run, coalesce(route, 'learned') AS route,
       count(*) AS images,
       CAST(coalesce(sum(source_bytes), 0) AS BIGINT) AS bytes_in,
       CAST(coalesce(sum(bitstream_bytes), 0) AS BIGINT) AS bytes_out,
       avg(psnr) AS mean_psnr,
       count(*) FILTER (WHERE floor_met) AS floor_met,
       count(*) FILTER (WHERE NOT floor_met) AS floor_missed
FROM metrics WHERE status = 'ok' AND ($run IS NULL OR run = $run)
GROUP BY ALL
"""
ROUTE_ORDER = ("learned", "jpeg-lossless", "original")  # codec.bitstream.ROUTES


def route_summaries(con: duckdb.DuckDBPyConnection, run: str | None = None) -> list[dict]:
    """One dict per run and route, runs oldest first, routes in ROUTE_ORDER (fields:
    docs/pipeline.md, "Summaries")."""
    rows = _rows(con, _ROUTES_SQL, {"run": run})
    order = {r: i for i, r in enumerate(runs(con))}
    totals: dict[str, list[int]] = {}
    for r in rows:
        t = totals.setdefault(r["run"], [0, 0])
        t[0] += r["images"]
        t[1] += r["bytes_out"]
    for r in rows:
        images, stored = totals[r["run"]]
        r["image_share"] = 100.0 * r["images"] / images if images else None
        r["byte_share"] = 100.0 * r["bytes_out"] / stored if stored else None
        r["savings_pct"] = (100.0 * (1.0 - r["bytes_out"] / r["bytes_in"])
                            if r["bytes_in"] else None)
    rank = {name: i for i, name in enumerate(ROUTE_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["run"], len(order)), r["run"],
                                       rank.get(r["route"], len(rank)), r["route"]))


def runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Run ids, oldest first."""
    return [r["run"] for r in _rows(con, "SELECT run FROM metrics GROUP BY run "
                                         "ORDER BY min(timestamp), run")]


_WORST_ORDER = {
    "psnr": "psnr ASC NULLS LAST",
    "bpp": "bpp DESC NULLS LAST",
    "savings": "savings_pct ASC NULLS LAST",
}


def worst_images(con: duckdb.DuckDBPyConnection, run: str | None = None, by: str = "psnr",
                 n: int = 10) -> list[dict]:
    """The ``n`` worst ok rows: lowest PSNR (``by="psnr"``), highest bpp (``"bpp"``) or
    lowest savings, 100 × (1 − bitstream_bytes / source_bytes) (``"savings"``; negative
    when the stream is larger than its source). Ties break by run and key."""
    if by not in _WORST_ORDER:
        raise MetricsError(f"worst images by {by!r}: choose one of {', '.join(WORST_BY)}")
    sql = f"""
        SELECT run, source_key, width, height, source_bytes, bitstream_bytes,
               CASE WHEN source_bytes > 0
                    THEN 100 * (1 - CAST(bitstream_bytes AS DOUBLE) / source_bytes) END
                   AS savings_pct,
               bpp, psnr, method, iterations
        FROM metrics
        WHERE status = 'ok' AND ($run IS NULL OR run = $run)
        ORDER BY {_WORST_ORDER[by]}, run, source_key
        LIMIT $n"""
    return _rows(con, sql, {"run": run, "n": max(0, int(n))})


def failures(con: duckdb.DuckDBPyConnection, run: str | None = None,
             n: int | None = None) -> list[dict]:
    """Error rows, newest first: run, key, error_stage, error, timestamp, and
    ``fixed_later``: whether a later run encoded the same source URL successfully."""
    sql = """
        SELECT m.run, m.source_key, m.error_stage, m.error, m.timestamp,
               EXISTS (SELECT 1 FROM metrics l WHERE l.source_url = m.source_url
                       AND l.status = 'ok' AND l.timestamp > m.timestamp) AS fixed_later
        FROM metrics m
        WHERE m.status IS DISTINCT FROM 'ok' AND ($run IS NULL OR m.run = $run)
        ORDER BY m.timestamp DESC, m.run, m.source_key
        LIMIT $n"""
    return _rows(con, sql, {"run": run, "n": n})


def count_failures(con: duckdb.DuckDBPyConnection, run: str | None = None) -> int:
    return _rows(con, "SELECT count(*) AS n FROM metrics WHERE status IS DISTINCT FROM 'ok' "
                      "AND ($run IS NULL OR run = $run)", {"run": run})[0]["n"]


def query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of arbitrary SQL against the ``metrics`` view; the result of
    the last statement; ([], []) for statements without one. SQL errors: MetricsError."""
    try:
        rel = con.sql(sql)
        if rel is None:
            return [], []
        table = rel.to_arrow_table()
    except duckdb.Error as exc:
        raise MetricsError(f"SQL: {exc}") from None
    columns = list(rel.columns)
    data = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return columns, list(zip(*data, strict=True)) if data else []


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_time(ts: datetime | None) -> str:
    return "-" if ts is None else ts.strftime("%Y-%m-%d %H:%M:%S")


def fmt(value: Any, spec: str = "", unit: str = "") -> str:
    """A cell: '-' for None/NaN, ``spec`` for numbers, str() for the rest."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool) and spec:
        return f"{value:{spec}}{unit}"
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return f"{value}{unit}"


def summary_cells(s: dict) -> list[str]:
    return [s["run"], format_time(s["first"]), str(s["images"]), str(s["ok"]),
            str(s["failures"]), format_bytes(s["bytes_in"]), format_bytes(s["bytes_out"]),
            fmt(s["savings_pct"], ".1f", "%"), fmt(s["mean_bpp"], ".3f"),
            fmt(s["mean_psnr"], ".2f"), fmt(s["encode_seconds"], ".1f"),
            fmt(s["mean_encode_seconds"], ".2f"), ",".join(s["methods"])]


SUMMARY_HEADER = ["run", "started (UTC)", "images", "ok", "failed", "in", "out", "savings",
                  "bpp", "PSNR dB", "encode s", "s/image", "methods"]
GAIN_HEADER = ["run", "refined", "RD gain", "bpp saved", "PSNR gain dB"]
WORST_HEADER = ["run", "key", "size", "in", "out", "savings", "bpp", "PSNR dB", "method"]
FAILURE_HEADER = ["run", "key", "stage", "error", "fixed later"]
ROUTE_HEADER = ["run", "route", "images", "% images", "in", "out", "% bytes", "savings",
                "PSNR dB", "floor met", "below floor"]


def route_cells(r: dict) -> list[str]:
    return [r["run"], r["route"], str(r["images"]), fmt(r["image_share"], ".1f", "%"),
            format_bytes(r["bytes_in"]), format_bytes(r["bytes_out"]),
            fmt(r["byte_share"], ".1f", "%"), fmt(r["savings_pct"], ".1f", "%"),
            fmt(r["mean_psnr"], ".2f"), str(r["floor_met"]), str(r["floor_missed"])]


def gain_cells(s: dict) -> list[str]:
    return [s["run"], str(s["refined"]), fmt(s["rd_gain_pct"], ".2f", "%"),
            fmt(s["bpp_saved"], ".4f"), fmt(s["psnr_gain_db"], "+.2f")]


def worst_cells(r: dict) -> list[str]:
    size = f"{r['width']}x{r['height']}" if r["width"] is not None else "-"
    return [r["run"], r["source_key"], size, format_bytes(r["source_bytes"]),
            format_bytes(r["bitstream_bytes"]), fmt(r["savings_pct"], ".1f", "%"),
            fmt(r["bpp"], ".3f"), fmt(r["psnr"], ".2f"), fmt(r["method"])]


def failure_cells(r: dict) -> list[str]:
    return [r["run"], r["source_key"], fmt(r["error_stage"]), fmt(r["error"]),
            "yes" if r["fixed_later"] else "no"]


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per row: newlines and tabs in errors
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                 max_width: int = 60) -> str:
    """An aligned plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[_clip(c if isinstance(c, str) else _sql_cell(c), max_width) for c in row]
             for row in rows]
    head = [_clip(str(h), max_width) for h in header]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(head)]
    numeric = [bool(cells) and all(_looks_numeric(r[i]) for r in cells)
               for i in range(len(head))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, cells)])


_NUMERIC = re.compile(r"^[-+]?(\d[\d.,]*(e[-+]?\d+)?)( ?(%|B|KiB|MiB|GiB|TiB))?$|^-$")


def _looks_numeric(text: str) -> bool:
    return bool(_NUMERIC.match(text))


def _sql_cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: datetimes in ISO 8601, NaN/inf as null, Decimal as float."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_storage_options(text: str | None) -> dict | None:
    return _parse_storage_options(text, MetricsError)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``sgarc metrics`` to a subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "metrics", help="summarize a pipeline output's metrics, or query them with SQL",
        description="Per-run summary of the Parquet metrics under OUTPUT (a folder or an "
        "fsspec URL such as s3://bucket/archive): images, failures, bytes in and out, "
        "savings, mean bpp and PSNR, SGA's gain over the amortized encoder, encode time; "
        "then the worst images and the failures. --sql runs any DuckDB SQL against the "
        "view `metrics` (one row per image per run, docs/pipeline.md, plus `run` and "
        "`part`).")
    p.add_argument("output", metavar="[compact] OUTPUT", nargs="+",
                   help="the pipeline's output; `sgarc metrics compact OUTPUT` merges each "
                   "finished run's small parts into a few large files instead (safe to "
                   "interrupt and to rerun; readers see the same rows before and after)")
    p.add_argument("--run", metavar="ID", default=None, help="only this run")
    p.add_argument("--sql", metavar="SQL", default=None,
                   help="print the result of this SQL over the view `metrics` instead")
    p.add_argument("--worst", metavar="N", type=int, default=10,
                   help="worst images (and failures) to list (default 10; 0: none)")
    p.add_argument("--by", choices=WORST_BY, default="psnr",
                   help="worst by lowest PSNR (default), highest bpp or lowest savings")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=f"for OUTPUT: {STORAGE_OPTIONS_HELP}")
    p.set_defaults(func=cmd_metrics)
    return p


def compact(output_url: str, storage_options: dict | None = None,
            run: str | None = None) -> list[tuple[str, int, int]]:
    """Compact the parts of each finished run (or of ``run``): (run, parts, rows) each.
    A run without summary.json may still be writing (or be resumed): it is left alone."""
    from pipeline.plan import summary_key

    storage = Storage(output_url, storage_options)
    finished = sorted({key.split("/")[1] for key in storage.list_keys("_jobs", "summary.json")
                       if key.count("/") == 2})
    if run is not None:
        if not storage.exists(summary_key(run)):
            raise MetricsError(f"run {run} under {display_url(output_url)} has not finished "
                               "(no summary.json): compact it when it has")
        finished = [run]
    done = []
    for run_id in finished:
        parts, rows = sink.compact(storage, run_id)
        if parts:
            done.append((run_id, parts, rows))
    return done


def cmd_metrics(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options)
    words = args.output
    if len(words) == 2 and words[0] == "compact":
        for run_id, parts, rows in compact(words[1], options, args.run):
            print(f"run {run_id}: {parts} parts ({rows} rows) merged")
        return 0
    if len(words) != 1:
        raise MetricsError("give one OUTPUT (or `compact OUTPUT`)")
    args.output = words[0]
    if args.worst < 0:
        raise MetricsError("--worst must be >= 0")
    con = connect(args.output, options, run=args.run)
    try:
        if args.sql is not None:
            columns, rows = query(con, args.sql)
            if args.json:
                print(json.dumps({"columns": columns, "rows": jsonable(rows)}, indent=1))
            elif columns:
                print(format_table(columns, rows, max_width=80))
                print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
            return 0
        summaries = run_summaries(con)
        by_route = route_summaries(con)
        worst = worst_images(con, by=args.by, n=args.worst) if args.worst else []
        failed = failures(con, n=args.worst) if args.worst else []
        total_failed = sum(s["failures"] for s in summaries)
    finally:
        con.close()
    if args.json:
        print(json.dumps(jsonable({"output": display_url(args.output), "runs": summaries,
                                   "routes": by_route, "worst": worst, "worst_by": args.by,
                                   "failures": failed, "failures_total": total_failed}),
                         indent=1))
        return 0
    images = sum(s["images"] for s in summaries)
    print(f"metrics under {display_url(args.output)}: {len(summaries)} run"
          f"{'s' if len(summaries) != 1 else ''}, {images} rows\n")
    print(format_table(SUMMARY_HEADER, [summary_cells(s) for s in summaries]))
    if by_route:
        print("\nroutes: how the images are stored (share of the run's images and bytes)")
        print(format_table(ROUTE_HEADER, [route_cells(r) for r in by_route]))
    refined = [s for s in summaries if s["refined"]]
    if refined:
        print("\nrefinement vs the amortized start (refined images only)")
        print(format_table(GAIN_HEADER, [gain_cells(s) for s in refined]))
    if worst:
        print(f"\nworst {len(worst)} by {args.by}")
        print(format_table(WORST_HEADER, [worst_cells(r) for r in worst]))
    if failed:
        more = f", newest {len(failed)} shown" if total_failed > len(failed) else ""
        print(f"\nfailures: {total_failed}{more}")
        print(format_table(FAILURE_HEADER, [failure_cells(r) for r in failed], max_width=100))
    return 0
