"""`sgarc report`: one self-contained HTML page about a pipeline output's metrics.

    write_report("archive/", "report.html")             # or s3://bucket/archive

Tables from :mod:`jobs.metrics`, plots by matplotlib as SVG data: URIs, a gallery of the
worst images (source and decoded crops side by side); no JavaScript, nothing external, the
markup well-formed XHTML. docs/pipeline.md ("The report") describes the page.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from codec.files import atomic_write
from jobs.metrics import (
    FAILURE_HEADER,
    GAIN_HEADER,
    ROUTE_HEADER,
    SUMMARY_HEADER,
    WORST_HEADER,
    MetricsError,
    connect,
    count_failures,
    display_url,
    failure_cells,
    failures,
    gain_cells,
    parse_storage_options,
    route_cells,
    route_summaries,
    run_summaries,
    summary_cells,
    worst_cells,
    worst_images,
)
from jobs.options import STORAGE_OPTIONS_HELP
from pipeline.storage import Storage, read_url

MAX_POINTS = 5000
GALLERY = 6  # images in the gallery: each costs one full decode
CROP = 192  # px, the side of a gallery crop (shown at twice its size)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> list[dict]:
    return con.sql(sql, params=params).to_arrow_table().to_pylist()


def scatter_points(con: duckdb.DuckDBPyConnection, limit: int = MAX_POINTS
                   ) -> tuple[list[dict], int]:
    """(points, total): bpp, psnr, method, run, key of ok rows of the learned route (the
    lossless routes have no distortion to plot); a deterministic sample of ``limit`` of
    them (by a hash of run and key) when there are more."""
    where = ("status = 'ok' AND bpp IS NOT NULL AND psnr IS NOT NULL "
             "AND coalesce(route, 'learned') = 'learned'")
    total = _rows(con, f"SELECT count(*) AS n FROM metrics WHERE {where}")[0]["n"]
    points = _rows(con, f"""
        SELECT bpp, psnr, method, run, source_key FROM metrics WHERE {where}
        ORDER BY hash(run, source_key), run, source_key LIMIT $n""", {"n": limit})
    return points, total


def savings_histogram(con: duckdb.DuckDBPyConnection) -> dict:
    """Per-image savings 1 − out/in of ok rows in fixed-width bins over [lo, hi).

    The range covers the data rounded out to the bin width, floored at −100%: images whose
    stream is more than twice their source land in the first bin (``clipped`` counts them).
    """
    expr = "1 - CAST(bitstream_bytes AS DOUBLE) / source_bytes"
    where = "status = 'ok' AND source_bytes > 0 AND bitstream_bytes IS NOT NULL"
    stats = _rows(con, f"SELECT count(*) AS n, min({expr}) AS lo, max({expr}) AS hi, "
                       f"count(*) FILTER (WHERE {expr} < -1) AS clipped "
                       f"FROM metrics WHERE {where}")[0]
    if not stats["n"]:
        return {"n": 0, "lo": 0.0, "width": 0.05, "counts": [], "clipped": 0}
    lo, hi = max(-1.0, stats["lo"]), stats["hi"]
    edges = MaxNLocator(nbins=25, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)  # nice edges
    width = float(edges[1] - edges[0])
    start = math.floor(lo / width + 1e-9) * width
    bins = max(1, math.floor((hi - start) / width) + 1)
    got = _rows(con, f"""
        SELECT least(greatest(CAST(floor(({expr} - $start) / $width) AS BIGINT), 0), $last)
               AS bin, count(*) AS n
        FROM metrics WHERE {where} GROUP BY bin""",
                {"start": start, "width": width, "last": bins - 1})
    counts = [0] * bins
    for r in got:
        counts[r["bin"]] += r["n"]
    return {"n": stats["n"], "lo": start, "width": width, "counts": counts,
            "clipped": stats["clipped"]}


def gallery_rows(con: duckdb.DuckDBPyConnection, n: int = GALLERY) -> list[dict]:
    """The ``n`` learned streams of lowest PSNR whose bitstream is still the one on disk:
    only each image's newest ok row counts (a later run overwrites the key)."""
    return _rows(con, """
        SELECT * FROM (
            SELECT run, source_key, source_url, bitstream_key, bitstream_sha256, psnr, bpp,
                   route FROM metrics WHERE status = 'ok'
            QUALIFY row_number() OVER (PARTITION BY source_key
                                       ORDER BY timestamp DESC, run DESC) = 1)
        WHERE coalesce(route, 'learned') = 'learned' AND psnr IS NOT NULL
              AND bitstream_key IS NOT NULL
        ORDER BY psnr, run, source_key LIMIT $n""", {"n": max(0, int(n))})


def collect(con: duckdb.DuckDBPyConnection, worst: int = 20) -> dict:
    points, total = scatter_points(con)
    return {
        "summaries": run_summaries(con),
        "routes": route_summaries(con),
        "points": points,
        "points_total": total,
        "histogram": savings_histogram(con),
        "worst": worst_images(con, by="psnr", n=worst),
        "failures": failures(con, n=worst),
        "failures_total": count_failures(con),
    }


# ---------------------------------------------------------------------------------------------
# Gallery: the worst images up close
# ---------------------------------------------------------------------------------------------


def worst_window(source: np.ndarray, decoded: np.ndarray, side: int
                 ) -> tuple[int, int, int, float]:
    """(top, left, side, mse) of the square window, ``side`` px or the image's shorter side,
    where the mean squared error between two same-size images is largest (summed-area
    table: every window position in one pass)."""
    err = ((source.astype(np.float32) - decoded.astype(np.float32)) ** 2).mean(axis=-1)
    c = max(1, min(side, *err.shape))
    s = np.pad(err.cumsum(0, dtype=np.float64).cumsum(1), ((1, 0), (1, 0)))
    windows = s[c:, c:] - s[:-c, c:] - s[c:, :-c] + s[:-c, :-c]
    top, left = np.unravel_index(int(np.argmax(windows)), windows.shape)
    return int(top), int(left), c, float(windows[top, left]) / (c * c)


def _data_uri(pixels: np.ndarray) -> str:
    """A lossless WebP (PNG where Pillow lacks WebP) as a data: URI: the page stays one file
    and the crop shows the codec's artefacts, not those of the page's own compression."""
    from PIL import Image, features

    fmt = "WEBP" if features.check("webp") else "PNG"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def gallery(rows: list[dict], storage: Storage, storage_options: dict | None = None,
            n: int = GALLERY, side: int = CROP) -> tuple[list[dict], list[tuple[str, str]]]:
    """(entries, skipped): for the first ``n`` rows that can be shown, the crop of the source
    and of the decoded bitstream where the error is largest; a row that cannot be shown
    becomes (key, reason), so one moved source never costs the report. Work is bounded by
    the rows: at most one full decode each."""
    from codec.api import decode
    from codec.images import load_image

    entries, skipped = [], []
    for r in rows:
        if len(entries) == n:
            break
        key = r["source_key"]
        try:
            stream = storage.read_bytes(r["bitstream_key"])
            if r["bitstream_sha256"] and hashlib.sha256(stream).hexdigest() != r[
                    "bitstream_sha256"]:
                raise ValueError("the bitstream was replaced after this run")
            decoded = decode(stream, device="cpu", read_metadata=False).rgb
            source = load_image(read_url(r["source_url"], storage_options), alpha="keep",
                                depth="reduce", metadata="drop-oversized").rgb
            if source.shape != decoded.shape:
                raise ValueError(f"source is {source.shape[1]}x{source.shape[0]}, the "
                                 f"stream {decoded.shape[1]}x{decoded.shape[0]}")
        except Exception as exc:  # whatever fails for one image: listed with its reason
            skipped.append((key, f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        top, left, c, mse = worst_window(source, decoded, side)
        window = np.s_[top:top + c, left:left + c]
        entries.append({**r, "top": top, "left": left, "side": c,
                        "crop_psnr": 10 * math.log10(255 ** 2 / mse) if mse > 0 else math.inf,
                        "source_uri": _data_uri(source[window]),
                        "decoded_uri": _data_uri(decoded[window])})
    return entries, skipped


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, SVG)
# ---------------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.6, panels: int = 1) -> tuple[Figure, list]:
    """A matplotlib Figure without pyplot (no global state, no display backend needed)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, [fig.add_subplot(1, panels, k + 1) for k in range(panels)]


def svg_uri(fig: Figure) -> str:
    """The figure as an SVG data: URI. Each plot is its own SVG document, so the ids
    matplotlib gives its elements cannot clash between plots; text stays text, and a fixed
    hash salt and no date make the same data give the same bytes."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sgarc"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return f"data:image/svg+xml;base64,{base64.b64encode(buf.getvalue()).decode()}"


def _empty(message: str) -> Figure:
    fig, (ax,) = _figure(6.4, 1.2)
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return fig


def scatter_figure(points: list[dict]) -> Figure:
    """bpp (x) against PSNR (y), coloured by method when there are several, else by run."""
    if not points:
        return _empty("no encoded images")
    methods = sorted({str(p["method"]) for p in points})
    by = "method" if len(methods) > 1 else "run"
    fig, (ax,) = _figure()
    for i, g in enumerate(sorted({str(p[by]) for p in points})):
        mine = [p for p in points if str(p[by]) == g]
        ax.scatter([p["bpp"] for p in mine], [p["psnr"] for p in mine], s=14, alpha=0.65,
                   label=f"{by} {g}", gid=f"points-{i}")
    ax.set(xlabel="bits per pixel (bitstream size)", ylabel="PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def histogram_figure(hist: dict) -> Figure:
    counts = hist["counts"]
    if not counts:
        return _empty("no encoded images")
    lefts = [(hist["lo"] + i * hist["width"]) * 100 for i in range(len(counts))]
    fig, (ax,) = _figure()
    for i, bar in enumerate(ax.bar(lefts, counts, width=hist["width"] * 100, align="edge",
                                   edgecolor="white")):
        bar.set_gid(f"bar-{i}")
    ax.set(xlabel="savings per image, 1 − bitstream / source (%)", ylabel="images")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _run_label(summary: dict, date_only: bool) -> str:
    first = summary["first"]
    if first is None:
        return summary["run"][:12]
    return first.strftime("%Y-%m-%d" if date_only else "%m-%d %H:%M")


def trend_figure(summaries: list[dict]) -> Figure:
    """Mean bpp, mean PSNR and savings % per run (oldest first), three panels."""
    if not summaries:
        return _empty("no runs")
    panels = (("mean_bpp", "mean bpp"), ("mean_psnr", "mean PSNR (dB)"),
              ("savings_pct", "savings (%)"))
    n = len(summaries)
    days = [s["first"].date() for s in summaries if s["first"] is not None]
    date_only = len(set(days)) == len(days)  # one run a day or fewer: dates say enough
    ticks = list(range(0, n, max(1, math.ceil(n / 6))))
    fig, axes = _figure(9.6, 2.9, panels=len(panels))
    for k, (ax, (field, name)) in enumerate(zip(axes, panels, strict=True)):
        values = [(i, s[field]) for i, s in enumerate(summaries) if s[field] is not None]
        ax.plot([i for i, _ in values], [v for _, v in values], marker="o",
                color=f"C{k}", gid=f"trend-{field}")
        ax.set_xticks(ticks, [_run_label(summaries[i], date_only) for i in ticks],
                      rotation=30, ha="right", fontsize="small")
        ax.set(xlim=(-0.5, n - 0.5), xlabel="run start (UTC)", ylabel=name)
        ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.key { max-width: 420px; overflow-wrap: anywhere; }
td.err { max-width: 560px; overflow-wrap: anywhere; font-family: monospace; font-size: 12px; }
figure { margin: 12px 0 24px; } figcaption { color: #555; font-size: 13px; }
img.plot { max-width: 100%; height: auto; display: block; }
.note { color: #555; font-size: 13px; }
img.crop { image-rendering: pixelated; margin-right: 6px; max-width: 48%; height: auto; }
"""

_NUMERIC_COLUMNS = {"images", "ok", "failed", "in", "out", "savings", "bpp", "PSNR dB",
                    "encode s", "s/image", "refined", "RD gain", "bpp saved", "PSNR gain dB",
                    "size", "% images", "% bytes", "floor met", "below floor"}


def _table(header: Sequence[str], rows: list[list[str]], classes: dict[str, str] | None = None
           ) -> str:
    classes = dict(classes or {})
    for h in header:
        if h in _NUMERIC_COLUMNS:
            classes.setdefault(h, "num")
    head = "".join(f'<th class="{classes[h]}">{esc(h)}</th>' if h in classes
                   else f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="{classes[h]}">{esc(c)}</td>' if h in classes
                        else f"<td>{esc(c)}</td>" for h, c in zip(header, row, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _gallery_html(entries: list[dict], skipped: list[tuple[str, str]]) -> list[str]:
    if not entries and not skipped:
        return []
    out = [f'<h2 id="gallery">The {len(entries)} worst images up close</h2>',
           '<p class="note">Lowest PSNR first; each pair is the source (left) and the decoded '
           "bitstream (right), cut where the squared error is largest and shown at twice its "
           "size, pixel for pixel.</p>"]
    for e in entries:
        size, shown = e["side"], 2 * e["side"]
        imgs = "".join(
            f'<img class="crop" src="{uri}" width="{shown}" height="{shown}" '
            f'alt="{esc(what)} of {esc(e["source_key"])}"/>'
            for what, uri in (("source", e["source_uri"]), ("decoded", e["decoded_uri"])))
        out.append(
            f'<figure class="pair"><div>{imgs}</div><figcaption>{esc(e["source_key"])} '
            f'(run {esc(e["run"])}): {e["psnr"]:.2f} dB at {e["bpp"]:.3f} bpp over the image; '
            f'{e["crop_psnr"]:.2f} dB in this {size}×{size} crop at x {e["left"]}, '
            f'y {e["top"]}.</figcaption></figure>')
    if skipped:
        items = "".join(f"<li>{esc(key)}: {esc(why)}</li>" for key, why in skipped)
        out.append(f'<p class="note">Not shown:</p><ul class="note">{items}</ul>')
    return out


def render(data: dict, source: str, generated: datetime | None = None) -> str:
    """The page as a string (well-formed XHTML; every data string escaped)."""
    generated = generated or datetime.now(UTC)
    summaries = data["summaries"]
    images = sum(s["images"] for s in summaries)
    parts = [
        "<!DOCTYPE html>",
        '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        f"<title>sgarc report: {esc(source)}</title><style>{_CSS}</style></head><body>",
        f"<h1>sgarc metrics: {esc(source)}</h1>",
        f'<p class="note">{len(summaries)} run{"s" if len(summaries) != 1 else ""}, '
        f"{images} rows; generated {esc(generated.strftime('%Y-%m-%d %H:%M:%S'))} UTC.</p>",
        '<h2 id="runs">Runs</h2>',
        _table(SUMMARY_HEADER, [summary_cells(s) for s in summaries]),
    ]
    if data.get("routes"):
        parts += ['<h2 id="routes">Routes</h2>',
                  '<p class="note">How the images are stored: learned (the codec), '
                  "jpeg-lossless (the JPEG XL transcode of a JPEG, bit-exact) or original "
                  "(the source file), by the job's policy (a PSNR floor; never bigger than "
                  "the source). Shares of each run's images and stored bytes; PSNR of the "
                  "lossless routes is exact (100 dB).</p>",
                  _table(ROUTE_HEADER, [route_cells(r) for r in data["routes"]])]
    refined = [s for s in summaries if s["refined"]]
    if refined:
        parts += ["<h2>Refinement against the amortized start</h2>",
                  '<p class="note">Refined images only (iterations &gt; 0). RD gain: mean '
                  "relative drop of the true RD loss; bpp saved: the model's estimated rate "
                  "of the amortized start minus that of the refined latents; PSNR gain: "
                  "decoded PSNR minus the amortized start's.</p>",
                  _table(GAIN_HEADER, [gain_cells(s) for s in refined])]
    shown = len(data["points"])
    sample = (f" A deterministic sample of {shown} of {data['points_total']} images."
              if data["points_total"] > shown else "")
    hist = data["histogram"]
    clipped = (f" {hist['clipped']} image(s) below −100% are counted in the first bin."
               if hist["clipped"] else "")
    plots = [("scatter", scatter_figure(data["points"]), "bpp against PSNR, one point per "
              f"learned stream.{sample}"),
             ("savings", histogram_figure(hist), "Savings per image, 1 − bitstream bytes / "
              f"source bytes, {hist['n']} images, bins of {hist['width'] * 100:g}%.{clipped}"),
             ("trend", trend_figure(summaries), "Mean bpp, mean PSNR and savings per run, "
              "oldest first.")]
    parts.append("<h2>Plots</h2>")
    parts += [f'<figure id="{name}"><img class="plot" src="{svg_uri(fig)}" '
              f'alt="{esc(caption)}"/><figcaption>{esc(caption)}</figcaption></figure>'
              for name, fig, caption in plots]
    if data["worst"]:
        parts += [f"<h2>Worst {len(data['worst'])} images by PSNR</h2>",
                  _table(WORST_HEADER, [worst_cells(r) for r in data["worst"]],
                         {"key": "key"})]
    parts += _gallery_html(data.get("gallery", []), data.get("gallery_skipped", []))
    total = data["failures_total"]
    parts.append(f"<h2>Failures ({total})</h2>")
    if data["failures"]:
        if total > len(data["failures"]):
            parts.append(f'<p class="note">The newest {len(data["failures"])} shown; '
                         "<code>sgarc metrics OUTPUT --sql</code> lists them all.</p>")
        parts.append(_table(FAILURE_HEADER, [failure_cells(r) for r in data["failures"]],
                            {"key": "key", "error": "err"}))
    else:
        parts.append('<p class="note">None.</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(output_url: str, html_path: str | Path, storage_options: dict | None = None,
                 run: str | None = None, *, worst: int = 20, pictures: int = GALLERY) -> Path:
    """Write the report of ``output_url``'s metrics (or of one ``run``) to the local file
    ``html_path``, atomically; returns its path. MetricsError when there are no metrics.
    ``pictures``: how many of the worst images the gallery shows (0: none)."""
    con = connect(output_url, storage_options, run=run)
    try:
        data = collect(con, worst=worst)
        rows = gallery_rows(con, 2 * pictures)  # spares for images that cannot be shown
    finally:
        con.close()
    data["gallery"], data["gallery_skipped"] = gallery(
        rows, Storage(output_url, storage_options), storage_options, n=pictures)
    source = display_url(output_url) + (f" (run {run})" if run else "")
    path = Path(html_path)
    atomic_write(path, render(data, source).encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``sgarc report`` to a subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "report", help="write an HTML page with tables and plots of OUTPUT's metrics",
        description="Write one self-contained HTML file (no scripts, nothing fetched) with "
        "the per-run summary, bpp against PSNR, the savings histogram, the trend across runs, "
        "the worst images (crops of the worst, source beside decoded) and the failures of "
        "the metrics under OUTPUT.")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("-o", "--out", default="report.html", metavar="HTML",
                   help="the file to write (default: report.html)")
    p.add_argument("--run", metavar="ID", default=None, help="only this run")
    p.add_argument("--worst", metavar="N", type=int, default=20,
                   help="worst images and failures to list (default 20)")
    p.add_argument("--pictures", metavar="N", type=int, default=GALLERY,
                   help=f"worst images shown as source/decoded crops; each is decoded "
                   f"(default {GALLERY}; 0: none)")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=f"for OUTPUT and the sources: {STORAGE_OPTIONS_HELP}")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    if args.worst < 0 or args.pictures < 0:
        raise MetricsError("--worst and --pictures must be >= 0")
    path = write_report(args.output, args.out, parse_storage_options(args.storage_options),
                        args.run, worst=args.worst, pictures=args.pictures)
    print(f"report: {path}")
    return 0
