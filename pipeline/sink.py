"""Per-image metrics rows and the Parquet parts that hold them (schema in docs/pipeline.md).

One row per input image per run. A shard's rows are written as one Parquet part,
`metrics/run=<run_id>/shard-<shard_id>.parquet`, after all its bitstreams, in one atomic
write: the part's existence is what marks the shard done.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import keys

SCHEMA = pa.schema([
    ("source_key", pa.string()),  # path relative to the input root
    ("source_url", pa.string()),
    ("source_bytes", pa.int64()),
    ("source_version", pa.string()),  # ETag on object stores, mtime locally
    ("source_format", pa.string()),
    ("source_mode", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("metadata_bytes", pa.int64()),  # META payload kept (EXIF, ICC, XMP, provenance); 0: none
    ("has_icc", pa.bool_()),  # the source carried an ICC profile
    ("metadata_dropped", pa.string()),  # fields not kept (drop-oversized), e.g. "xmp"
    ("bitstream_key", pa.string()),  # relative to the output root (pipeline/keys.py)
    ("bitstream_bytes", pa.int64()),
    ("bitstream_sha256", pa.string()),  # which bytes this row describes (the key is reused)
    ("bpp", pa.float64()),  # from the bitstream's size
    ("psnr", pa.float64()),  # RGB 8-bit, decoded vs source pixels
    ("estimated_bits", pa.float64()),  # model's -log2 P(z_hat) - log2 P(y_hat | z_hat)
    ("payload_bits", pa.int64()),
    ("amortized_bpp", pa.float64()),  # model estimate before iterative inference
    ("amortized_psnr", pa.float64()),
    ("rd_loss", pa.float64()),
    ("previous_rd_loss", pa.float64()),  # refinement runs: RD loss of the stored encoding
    ("replaced", pa.bool_()),  # refinement runs: whether this encoding replaced it
    ("amortized_rd_loss", pa.float64()),
    ("quality", pa.int32()),
    ("lmbda", pa.float64()),
    ("rate", pa.int32()),  # rate point of a variable-rate model (grid index); null: fixed
    ("layout", pa.string()),  # latents coded: tight | tight+1 | replicate (docs/bitstream.md)
    ("target", pa.string()),  # "psnr" or "bpp" when coded to a per-image target
    ("target_value", pa.float64()),
    ("target_met", pa.bool_()),  # false: the model could not reach it (coded at its end)
    ("route", pa.string()),  # learned | jpeg-lossless | original (codec.routes); null: learned
    ("min_psnr", pa.float64()),  # the run's quality floor (dB); null: none
    ("floor_met", pa.bool_()),  # the stored stream reaches the floor; null without a floor
    ("learned_bytes", pa.int64()),  # the learned encoding tried, whichever route won
    ("learned_psnr", pa.float64()),
    ("model_id", pa.string()),
    ("method", pa.string()),
    ("iterations", pa.int32()),  # the budget set for the run
    ("iterations_used", pa.int32()),  # fewer when the image stopped early (patience)
    ("encode_seconds", pa.float64()),
    ("device", pa.string()),
    ("run_id", pa.string()),
    ("shard_id", pa.string()),
    ("fingerprint", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("status", pa.string()),  # "ok" or "error"
    ("error_stage", pa.string()),  # plan | read | decode | encode | write | worker
    ("error", pa.string()),  # the reason, null when ok
])


def part_key(run_id: str, shard_id: str) -> str:
    return f"metrics/run={run_id}/shard-{shard_id}.parquet"


def bitstream_key(source_key: str) -> str:
    """``bitstreams/<source key>.sga``; names over 255 bytes shortened (pipeline/keys.py)."""
    return keys.bitstream_key(source_key)


def source_columns(key: str, url: str | None, size: int, version: str) -> dict:
    """The columns that identify a row's source (what skipping and refinement match on).

    A name that is not UTF-8 (refused at planning) is stored with U+FFFD where its
    undecodable bytes were: Parquet strings are UTF-8, and its error row must be written."""
    return {"source_key": keys.as_text(key), "source_url": url and keys.as_text(url),
            "source_bytes": size, "source_version": version}


def now() -> datetime:
    return datetime.now(UTC)


def empty_row() -> dict:
    return dict.fromkeys(SCHEMA.names)


def table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**empty_row(), **r} for r in rows], schema=SCHEMA)


def part_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table_of(rows), buf, compression="zstd")
    return buf.getvalue()


def read_part(data: bytes, columns: list[str] | None = None, *,
              use_threads: bool = True) -> pa.Table:
    """A part, or those of `columns` it has: parts written before a column existed lack it."""
    part = pq.ParquetFile(io.BytesIO(data))
    if columns is not None:
        columns = [c for c in columns if c in part.schema_arrow.names]
    return part.read(columns=columns, use_threads=use_threads)


# ---------------------------------------------------------------------------------------------
# The metrics as readers see them: shard parts and compacted files
# ---------------------------------------------------------------------------------------------
#
# A run writes one small part per shard. `compact` merges a finished run's parts into a few
# large files, `metrics/run=<id>/compact-<16 hex>.parquet`, that hold the same rows (the
# per-image schema), and name the parts they hold in their footer. Readers take every
# compacted file and every part that no compacted file of its run holds (`metric_files`),
# so a part
# that a killed compaction had not deleted yet is never counted twice, and one it had
# deleted is in the compacted file: the same rows before, during and after.

COMPACT_PREFIX = "compact-"
COMPACT_META = b"sgarc.parts"  # a compacted file's footer: the shard ids of the parts it holds
PART_PREFIX = "shard-"
COMPACT_ROWS = 250_000  # rows per compacted file, about (a few tens of MB)
COMPACT_ROW_GROUP = 65_536  # rows per row group of a compacted file, about
_COMPACT_READ = 512  # parts per group read for compaction (at most)
_READS_IN_FLIGHT = 16  # parts read at once by the thread pool


def run_of(key: str) -> str:
    """The run id of a metrics key ``metrics/run=<id>/<file>``."""
    return key.split("/")[1][len("run="):]


def is_compacted(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(COMPACT_PREFIX)


def shard_of_part(key: str) -> str | None:
    """The shard id in a part's name (``shard-<id>.parquet``); None for other files."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith(PART_PREFIX) and name.endswith(".parquet"):
        return name[len(PART_PREFIX):-len(".parquet")]
    return None


def duckdb_connection(storage, memory_limit: str = "1GB"):
    """A DuckDB connection that reads `storage`'s files (through its fsspec filesystem
    on object stores: no extension, no network but the files), spilling to a temp dir past
    `memory_limit`: what bounds a query's memory however many rows it reads."""
    import tempfile

    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False,
                                 "temp_directory": tempfile.gettempdir(),
                                 "memory_limit": memory_limit, "threads": 2})
    con.execute("SET TimeZone = 'UTC'; SET enable_progress_bar = false")
    if storage.protocol != "file":
        con.register_filesystem(storage.fs)
    return con


def duck_path(storage, key: str) -> str:
    """How DuckDB names `key`: a local path, or the URL of the registered filesystem, with
    glob characters escaped (``[`` -> ``[[]``): DuckDB globs every path it is given."""
    path = storage.full_path(key) if storage.protocol == "file" else storage.url_of(key)
    return re.sub(r"([*?\[])", r"[\1]", path)


def compacted_shards(storage, compacted: list[str]) -> set[tuple[str, str]]:
    """(run id, shard id) of every part the compacted files hold: the names a compacted
    file records in its footer (``sgarc.parts``), read without the rows."""
    from concurrent.futures import ThreadPoolExecutor

    def held(key: str) -> list[tuple[str, str]]:
        with storage.fs.open(storage.full_path(key), "rb") as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        return [(run_of(key), s) for s in json.loads(meta.get(COMPACT_META, b"[]"))]

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(compacted)))) as pool:
        return {pair for pairs in pool.map(held, compacted) for pair in pairs}


def metric_files(storage, run: str | None = None) -> list[str]:
    """The metrics files readers read (keys, sorted): every compacted file, and every part
    whose shard is in no compacted file of its run."""
    prefix = "metrics" if run is None else f"metrics/run={run}"
    keys = [k for k in storage.list_keys(prefix, ".parquet") if k.count("/") == 2]
    compacted = [k for k in keys if is_compacted(k)]
    covered = compacted_shards(storage, compacted)
    return [k for k in keys if is_compacted(k) or (run_of(k), shard_of_part(k)) not in covered]


def committed_shards(storage, run: str) -> set[str]:
    """Shard ids of `run` that are committed: a part of their own, or in a compacted file.
    One listing of the run's folder, not a lookup per shard."""
    keys = storage.list_keys(f"metrics/run={run}", ".parquet")
    compacted = [k for k in keys if is_compacted(k)]
    done = {s for k in keys if (s := shard_of_part(k)) is not None}
    return done | {s for _, s in compacted_shards(storage, compacted)}


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows of any part (old ones lack newer columns) in the current SCHEMA, or in `schema`
    (some of its fields)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    columns = [table[f.name].cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def iter_part_groups(storage, parts: list[str], group: int = _COMPACT_READ,
                     columns: list[str] | None = None) -> Iterator[tuple[list[str], pa.Table]]:
    """(keys, rows) of `parts` in order, in groups of up to `group` parts or about
    COMPACT_ROW_GROUP rows, conformed to SCHEMA (or its `columns`) once per group: parts of
    different ages differ in columns. A pool reads _READS_IN_FLIGHT parts at a time (one
    request each on object stores), so memory is one group plus those reads, however large
    the parts. For many small parts, where DuckDB's `union_by_name` would read every
    footer at once (4 GiB at 31,250 parts)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])

    def read(key: str) -> pa.Table:
        return read_part(storage.read_bytes(key), columns, use_threads=False)  # pool's threads

    todo = iter(parts)
    with ThreadPoolExecutor(max_workers=_READS_IN_FLIGHT) as pool:
        window = deque((k, pool.submit(read, k)) for k in islice(todo, _READS_IN_FLIGHT))
        held: list[str] = []
        tables: list[pa.Table] = []
        rows = 0
        while window:
            key, future = window.popleft()
            table = future.result()
            window.extend((k, pool.submit(read, k)) for k in islice(todo, 1))
            held.append(key)
            tables.append(table)
            rows += table.num_rows
            if len(held) >= group or rows >= COMPACT_ROW_GROUP or not window:
                yield held, conform(pa.concat_tables(tables, promote_options="permissive"),
                                    schema)
                held, tables, rows = [], [], 0


class _CompactedFile:
    """One compacted file being written: whole parts, in row groups of COMPACT_ROW_GROUP."""

    def __init__(self, storage, run: str) -> None:
        self.storage, self.run = storage, run
        self.buf = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buf, SCHEMA, compression="zstd")
        self.held: list[str] = []
        self.pending: list[pa.Table] = []
        self.rows = self.flushed = 0

    def add(self, parts: list[str], table: pa.Table) -> None:
        """The rows of these parts (all of them)."""
        self.held += parts
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows - self.flushed >= COMPACT_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            group = pa.concat_tables(self.pending)
            self.writer.write_table(group, row_group_size=max(1, group.num_rows))
            self.pending, self.flushed = [], self.rows

    def commit(self) -> list[str]:
        """Write the file (atomically); the parts it holds."""
        self.flush()
        self.writer.add_key_value_metadata(
            {COMPACT_META: json.dumps([shard_of_part(k) for k in self.held])})
        self.writer.close()
        name = hashlib.sha256("\0".join(self.held).encode()).hexdigest()[:16]
        self.storage.write_atomic(f"metrics/run={self.run}/{COMPACT_PREFIX}{name}.parquet",
                                  self.buf.getvalue())
        return self.held


def compact(storage, run: str, rows_per_file: int = COMPACT_ROWS) -> tuple[int, int]:
    """Merge `run`'s parts into compacted files; (parts merged, rows). Idempotent and safe
    to kill: a compacted file is written whole (atomically) before any part it holds is
    deleted, and readers skip parts a compacted file holds (`metric_files`). A file holds
    whole parts only, so each shard's rows are in one place.

    Parts are read in groups (`iter_part_groups`; a file holds whole groups) and written
    in row groups of about COMPACT_ROW_GROUP rows: a row group per 16-row part would make
    every later scan read thousands of row-group headers."""
    parts = [k for k in metric_files(storage, run) if shard_of_part(k) is not None]
    live = set(parts)
    stale = [k for k in storage.list_keys(f"metrics/run={run}", ".parquet")  # leftovers
             if shard_of_part(k) is not None and k not in live]  # of a killed compaction
    rows = 0
    step = max(1, min(_COMPACT_READ, rows_per_file // 16))  # a file may overshoot by a step
    current = _CompactedFile(storage, run)
    for group, table in iter_part_groups(storage, parts, step):
        current.add(group, table)
        rows += table.num_rows
        if current.rows >= rows_per_file:
            stale += current.commit()
            current = _CompactedFile(storage, run)
    if current.held:
        stale += current.commit()
    else:
        current.writer.close()
    for key in stale:  # held by a compacted file now: readers already skip them
        storage.delete(key)
    return len(parts), rows


def duck_type(t: pa.DataType) -> str:
    """DuckDB's name for a column type of SCHEMA."""
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_integer(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    return "VARCHAR"


def read_metrics(con, storage, files: list[str]):
    """A DuckDB relation over the metrics `files` (keys, from `metric_files`): every column
    of SCHEMA (a part written before a column existed reads NULL there; one that no file
    has yet is all NULL), columns newer than SCHEMA as they are, plus ``run`` (from the
    file's ``run=<id>`` folder, not DuckDB's hive partitioning, so ``key=value`` folders
    above the output never become columns) and ``part`` (the file's path). Parts are read
    by name (``union_by_name``); nothing is read until the relation is queried."""
    if files:
        rel = con.read_parquet([duck_path(storage, k) for k in files], union_by_name=True,
                               hive_partitioning=False, filename=True)
    else:
        empty = SCHEMA.empty_table().append_column("filename", pa.array([], pa.string()))
        rel = con.from_arrow(empty)
    present = set(rel.columns)
    missing = [f"CAST(NULL AS {duck_type(f.type)}) AS \"{f.name}\""
               for f in SCHEMA if f.name not in present]
    return rel.project(", ".join(["* EXCLUDE (filename)", *missing,
                                  r"regexp_extract(filename, '/run=([^/]+)/[^/]+$', 1) AS run",
                                  "filename AS part"]))


def read_metrics_columns(con, storage, files: list[str], columns: list[str], folder: Path):
    """A DuckDB relation with `columns` of the metrics `files` (keys, from `metric_files`),
    for readers that need a few columns of every row (the planner's done check): the
    compacted files are read where they are, the small parts are first gathered into one
    local Parquet file under `folder` (`iter_part_groups`), so that tens of thousands of
    parts cost one pass of pooled reads instead of DuckDB's footer-by-footer union."""
    schema = pa.schema([SCHEMA.field(c) for c in columns])
    names = ", ".join(f'"{c}"' for c in columns)
    compacted = [k for k in files if is_compacted(k)]
    parts = [k for k in files if not is_compacted(k)]
    path = folder / "metrics-parts.parquet"
    with pq.ParquetWriter(path, schema) as writer:  # empty without parts: still a table
        for _, table in iter_part_groups(storage, parts, columns=columns):
            writer.write_table(table)
    con.read_parquet(str(path)).create_view("_parts")
    if not compacted:
        return con.sql(f"SELECT {names} FROM _parts")
    read_metrics(con, storage, compacted).create_view("_compacted")
    return con.sql(f"SELECT {names} FROM _compacted UNION ALL SELECT {names} FROM _parts")
