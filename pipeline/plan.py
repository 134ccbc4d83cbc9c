"""Planning a run: which images to encode, cut into deterministic shards, stored as data.

An image is skipped when an earlier run already encoded it successfully with the same
fingerprint (settings + model) from the same source bytes (key, size, version). So reruns
and nightly runs only do new or changed work. An image whose key the decode service could
not take (a newline in its name, ...) is refused here: its shard records why, and the
worker writes an error row (stage "plan") without reading it. Shard ids hash the
fingerprint and the images they hold, so the same work always gets the same id, and a
shard is done when its rows are committed (its Parquet part, or a compacted file).

Archive scale (DESIGN.md decision 10): nothing here holds the archive in memory. The
listing streams into local Parquet files; which images are done is an anti-join of that
listing against the metrics in DuckDB (spilling to disk past its memory limit); the result
streams out in key order and is cut into shards, written as Parquet manifests in chunks:

    <out>/_jobs/<run id>/plan/shards-00000.parquet   one row per image: its shard, key, ...
    <out>/_jobs/<run id>/plan.json                   the plan's settings, counts, manifests

`plan.json` is written last, so a plan is complete when it exists; an interrupted run
resumes from it. Plans from before manifests (`plan.json` holding every shard) still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import sink
from pipeline.keys import as_text, key_problem
from pipeline.storage import ObjectInfo, Storage

LISTING_BATCH = 100_000  # listed objects per local spill file
CHUNK_IMAGES = 50_000  # images per plan manifest (whole shards; a few MB)
# The done check's join and sort spill to disk past this, so the planner's memory stops
# growing with the archive (they took about 250 MB at 1 M objects, and grow with it)
PLAN_MEMORY_LIMIT = "256MB"
FORMAT = 2  # plan.json with manifests; plans without "format" hold their shards inline

LISTING_SCHEMA = pa.schema([
    ("key", pa.string()),  # as text (U+FFFD for bytes that are not UTF-8)
    ("raw", pa.binary()),  # the key's bytes when it is not UTF-8, else null
    ("size", pa.int64()),
    ("version", pa.string()),
])
MANIFEST_SCHEMA = pa.schema([
    ("shard_id", pa.string()),
    *LISTING_SCHEMA,
    ("refused", pa.string()),  # why the image is refused at planning, else null
    ("baseline", pa.float64()),  # refinement: the stored encoding's RD loss
    ("stored_route", pa.string()),  # refinement: what the archive holds (codec.routes)
    ("stored_bytes", pa.int64()),
    ("stored_psnr", pa.float64()),
])


@dataclass
class Shard:
    id: str
    images: list[ObjectInfo]
    # Refinement runs: the RD loss of each image's stored encoding; a new encoding replaces
    # the stored bitstream only when its RD loss is lower.
    baseline: dict[str, float] | None = None
    # Images refused at planning (key -> reason): they get an error row, nothing is read.
    refused: dict[str, str] | None = None
    # Refinement runs: each image's stored stream (route, bytes, psnr), so that a new one
    # replaces it only by the owner's rules (codec.routes.improves).
    stored: dict[str, dict] | None = None

    @classmethod
    def from_json(cls, d: dict) -> Shard:
        return cls(d["id"], [ObjectInfo(**i) for i in d["images"]], d.get("baseline"),
                   d.get("refused"), d.get("stored"))


@dataclass
class Plan:
    """A run's plan: its settings and counts here, its shards in Parquet manifests under the
    output (``manifests``), read a chunk at a time by :meth:`iter_shards`."""

    run_id: str
    input_url: str
    output_url: str
    fingerprint: str
    settings: dict
    skipped: int = 0  # images already done by earlier runs
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    mode: str = "encode"  # "encode": new and changed images; "refine": see make_refine_plan
    num_images: int = 0
    num_shards: int = 0
    manifests: list[str] = field(default_factory=list)  # keys under the output, in order
    inline: list[Shard] | None = None  # a plan from before manifests: its shards

    def iter_shards(self, output: Storage) -> Iterator[Shard]:
        """The shards in plan order, one manifest in memory at a time."""
        if self.inline is not None:
            yield from self.inline
            return
        for key in self.manifests:
            yield from _shards_of(pq.ParquetFile(io.BytesIO(output.read_bytes(key))),
                                  self.mode == "refine")

    def shard_sizes(self, output: Storage) -> Iterator[tuple[str, int]]:
        """(shard id, images) in plan order, reading the manifests' shard_id column only."""
        if self.inline is not None:
            yield from ((s.id, len(s.images)) for s in self.inline)
            return
        for key in self.manifests:
            ids = pq.read_table(io.BytesIO(output.read_bytes(key)), columns=["shard_id"])
            counts = ids.group_by("shard_id", use_threads=False).aggregate([([], "count_all")])
            yield from zip(counts["shard_id"].to_pylist(), counts["count_all"].to_pylist(),
                           strict=True)

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("inline")
        return json.dumps({"format": FORMAT, **d}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        if d.pop("format", None) is None:  # before manifests: every shard inline
            shards = [Shard.from_json(s) for s in d.pop("shards")]
            return cls(**d, num_images=sum(len(s.images) for s in shards),
                       num_shards=len(shards), inline=shards)
        return cls(**d)


def plan_key(run_id: str) -> str:
    return f"_jobs/{run_id}/plan.json"


def manifest_key(run_id: str, index: int) -> str:
    return f"_jobs/{run_id}/plan/shards-{index:05d}.parquet"


def summary_key(run_id: str) -> str:
    return f"_jobs/{run_id}/summary.json"


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def shard_id(fingerprint: str, images: Iterable[ObjectInfo]) -> str:
    h = hashlib.sha256(fingerprint.encode())
    for im in images:  # surrogateescape: a name that is not UTF-8 must not stop the plan
        h.update(f"\0{im.key}\0{im.size}\0{im.version}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def refusal(key: str) -> str | None:
    """Why an image is refused at planning (its key could not be served), or None.

    Keys are URL paths of the decode service, which takes no control characters,
    backslashes, non-UTF-8 names, ... (pipeline.keys.key_problem): archiving such an image
    would make a stream nobody can fetch, so it gets an error row instead."""
    problem = key_problem(key)
    if problem is None:
        return None
    return f"refused at planning: {problem}; `sgarc serve` could not serve it: rename the file"


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def make_plan(images: Iterable[ObjectInfo], input_url: str, output: Storage, settings: dict,
              fingerprint: str, shard_size: int, run_id: str | None = None, *,
              write: bool = True, also_done: Iterable[str] = ()) -> Plan:
    """Skip what is done, cut the rest into shards of `shard_size` in key order. With
    `write`, the manifests and plan.json are stored under the output; without (a dry run),
    the plan only counts. An image is done when an `ok` row of the same source bytes has
    `fingerprint` or one of `also_done` (the settings' fingerprints in the older latent
    layout and under the models their model supersedes:
    EncodeSettings.superseded_fingerprints)."""
    return _plan(images, input_url, output, settings, fingerprint, shard_size, run_id,
                 "encode", None, write, tuple(also_done))


def make_refine_plan(images: Iterable[ObjectInfo], input_url: str, output: Storage,
                     settings: dict, fingerprint: str, shard_size: int,
                     max_images: int | None = None, run_id: str | None = None, *,
                     write: bool = True) -> Plan:
    """Images whose stored encoding is below the target (method, iterations) of `settings`.

    Only images with a stored encoding of the same source bytes and model qualify (new or
    changed images belong to a coverage run). An image is done once any run reached the
    target for it, whether or not that run replaced the bitstream. Candidates with the
    highest stored RD loss come first (most to gain), up to `max_images`.
    """
    return _plan(images, input_url, output, settings, fingerprint, shard_size, run_id,
                 "refine", max_images, write)


_DONE_SQL = """
SELECT l.* FROM listing l ANTI JOIN (
    SELECT source_key, source_bytes, coalesce(source_version, '') AS source_version
    FROM metrics WHERE list_contains($fingerprints, fingerprint) AND status = 'ok') d
ON l.key = d.source_key AND l.size = d.source_bytes AND l.version = d.source_version
ORDER BY l.key, l.raw
"""

# The latest stored encoding of each current image (a row whose stream was written), unless
# some run already reached the target for it; most RD loss to gain first.
_REFINE_SQL = """
WITH m AS (
    SELECT l.key, l.raw, l.size, l.version, r.method, r.iterations, r.rd_loss, r.timestamp,
           r.replaced, r.route, r.bitstream_bytes, r.psnr
    FROM listing l JOIN metrics r ON l.key = r.source_key AND l.size = r.source_bytes
         AND l.version = coalesce(r.source_version, '')
    WHERE r.status = 'ok' AND r.model_id = $model),
reached AS (SELECT DISTINCT key FROM m
            WHERE method = $method AND coalesce(iterations, 0) >= $iterations),
stored AS (SELECT * FROM m WHERE replaced IS DISTINCT FROM false
           QUALIFY row_number() OVER (PARTITION BY key ORDER BY timestamp DESC) = 1)
SELECT s.key, s.raw, s.size, s.version, s.rd_loss AS baseline,
       coalesce(s.route, 'learned') AS stored_route, s.bitstream_bytes AS stored_bytes,
       s.psnr AS stored_psnr
FROM stored s ANTI JOIN reached USING (key)
ORDER BY coalesce(s.rd_loss, 0) DESC, s.key
LIMIT $limit
"""


# what the two queries read of the metrics
_METRICS_COLUMNS = ["source_key", "source_bytes", "source_version", "fingerprint", "status",
                    "model_id", "method", "iterations", "rd_loss", "timestamp", "replaced",
                    "route", "bitstream_bytes", "psnr"]


def _plan(images: Iterable[ObjectInfo], input_url: str, output: Storage, settings: dict,
          fingerprint: str, shard_size: int, run_id: str | None, mode: str,
          max_images: int | None, write: bool, also_done: tuple[str, ...] = ()) -> Plan:
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    plan = Plan(run_id or new_run_id(), input_url, output.url, fingerprint, settings,
                mode=mode)
    con = sink.duckdb_connection(output, PLAN_MEMORY_LIMIT)
    try:
        with tempfile.TemporaryDirectory(prefix="sgarc-plan-") as tmp:
            listed = _spill_listing(images, Path(tmp))
            con.read_parquet(f"{tmp}/listing-*.parquet").distinct().create_view("listing")
            sink.read_metrics_columns(con, output, sink.metric_files(output),
                                      _METRICS_COLUMNS, Path(tmp)).create_view("metrics")
            if mode == "refine":
                limit = max_images if max_images is not None else 2 ** 62
                result = con.sql(_REFINE_SQL, params={
                    "model": settings["model"], "method": settings["method"],
                    "iterations": settings["iterations"], "limit": max(0, limit)})
                salt = "refine:" + fingerprint
            else:
                result = con.sql(_DONE_SQL, params={"fingerprints": [fingerprint, *also_done]})
                salt = fingerprint
            _write_shards(plan, result.to_arrow_reader(CHUNK_IMAGES), salt, shard_size,
                          output if write else None)
    finally:
        con.close()
    plan.skipped = listed - plan.num_images
    if write:
        output.write_atomic(plan_key(plan.run_id), plan.to_json())
    return plan


def _spill_listing(images: Iterable[ObjectInfo], folder: Path) -> int:
    """Write the listing to local Parquet files of LISTING_BATCH objects; how many."""
    count, n = 0, 0
    batch: list[ObjectInfo] = []

    def flush() -> None:
        nonlocal n
        keys, raws = [], []
        for im in batch:
            text = as_text(im.key)
            keys.append(text)
            raws.append(None if text == im.key else
                        im.key.encode("utf-8", "surrogateescape"))
        pq.write_table(pa.table([keys, raws, [im.size for im in batch],
                                 [im.version or "" for im in batch]], schema=LISTING_SCHEMA),
                       folder / f"listing-{n:05d}.parquet")
        n += 1
        batch.clear()

    for im in images:
        batch.append(im)
        count += 1
        if len(batch) >= LISTING_BATCH:
            flush()
    if batch or n == 0:
        flush()  # an empty listing is one empty file: the SQL has a table to read
    return count


def _write_shards(plan: Plan, batches: pa.RecordBatchReader, salt: str, shard_size: int,
                  output: Storage | None) -> None:
    """Cut the ordered rows into shards and write them as manifests of about CHUNK_IMAGES
    images (whole shards); `output` None: count only."""
    chunk: list[pa.Table] = []
    in_chunk = 0
    rest: pa.Table | None = None

    def flush() -> None:
        nonlocal in_chunk
        if output is not None and chunk:
            key = manifest_key(plan.run_id, len(plan.manifests))
            buf = io.BytesIO()
            pq.write_table(pa.concat_tables(chunk), buf, compression="zstd")
            output.write_atomic(key, buf.getvalue())
            plan.manifests.append(key)
        chunk.clear()
        in_chunk = 0

    def cut(table: pa.Table, final: bool) -> pa.Table | None:
        nonlocal in_chunk
        whole = table.num_rows if final else table.num_rows - table.num_rows % shard_size
        if whole:
            chunk.append(_with_shards(table.slice(0, whole), salt, shard_size))
            in_chunk += whole
            plan.num_images += whole
            plan.num_shards += -(-whole // shard_size)
            if in_chunk >= CHUNK_IMAGES:
                flush()
        return table.slice(whole) if whole < table.num_rows else None

    step = -(-CHUNK_IMAGES // shard_size) * shard_size  # whole shards, about a chunk
    for batch in batches:
        table = pa.Table.from_batches([batch])
        table = pa.concat_tables([rest, table]) if rest is not None else table
        while table.num_rows > step:
            cut(table.slice(0, step), final=False)
            table = table.slice(step)
        rest = cut(table, final=False)
    if rest is not None:
        cut(rest, final=True)
    flush()


def _with_shards(table: pa.Table, salt: str, shard_size: int) -> pa.Table:
    """`table` (rows in plan order, whole shards but maybe the last) with its shard ids,
    refusals and the manifest's columns."""
    keys = [raw.decode("utf-8", "surrogateescape") if raw is not None else key
            for key, raw in zip(table["key"].to_pylist(), table["raw"].to_pylist(),
                                strict=True)]
    sizes, versions = table["size"].to_pylist(), table["version"].to_pylist()
    ids: list[str] = []
    for start in range(0, len(keys), shard_size):
        end = min(start + shard_size, len(keys))
        ident = shard_id(salt, (ObjectInfo(keys[i], sizes[i], versions[i])
                                for i in range(start, end)))
        ids += [ident] * (end - start)
    n = table.num_rows
    columns = {"shard_id": pa.array(ids, pa.string()),
               "refused": pa.array([refusal(k) for k in keys], pa.string())}
    return pa.table([columns[f.name] if f.name in columns else
                     table[f.name].cast(f.type) if f.name in table.column_names else
                     pa.nulls(n, f.type) for f in MANIFEST_SCHEMA], schema=MANIFEST_SCHEMA)


def _shards_of(manifest: pq.ParquetFile, refine: bool) -> Iterator[Shard]:
    """The shards of one manifest, in order."""
    current: Shard | None = None
    for batch in manifest.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            raw = row["raw"]
            key = raw.decode("utf-8", "surrogateescape") if raw is not None else row["key"]
            if current is None or current.id != row["shard_id"]:
                if current is not None:
                    yield current
                current = Shard(row["shard_id"], [], {} if refine else None,
                                stored={} if refine else None)
            current.images.append(ObjectInfo(key, row["size"], row["version"]))
            if row["refused"] is not None:
                current.refused = {**(current.refused or {}), key: row["refused"]}
            if refine:
                current.baseline[key] = row["baseline"]
                current.stored[key] = {"route": row["stored_route"],
                                       "bytes": row["stored_bytes"],
                                       "psnr": row["stored_psnr"]}
    if current is not None:
        yield current


def unfinished_plan(output: Storage, input_url: str, fingerprint: str,
                    mode: str = "encode") -> Plan | None:
    """The newest stored plan of this input and fingerprint whose run has no summary yet."""
    finished = {key.split("/")[1] for key in output.list_keys("_jobs", "summary.json")}
    candidates = []
    for key in output.list_keys("_jobs", "/plan.json"):
        if key.split("/")[1] in finished or key.count("/") != 2:
            continue
        plan = Plan.from_json(output.read_bytes(key))
        if (plan.input_url, plan.fingerprint, plan.mode) == (input_url, fingerprint, mode):
            candidates.append(plan)
    return max(candidates, key=lambda p: p.created) if candidates else None
