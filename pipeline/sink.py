"""Per-image metrics rows and the Parquet parts that hold them (schema in docs/pipeline.md).

One row per input image per run. A shard's rows are written as one Parquet part,
`metrics/run=<run_id>/shard-<shard_id>.parquet`, after all its bitstreams, in one atomic
write: the part's existence is what marks the shard done.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

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


def read_part(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A part, or those of `columns` it has: parts written before a column existed lack it."""
    part = pq.ParquetFile(io.BytesIO(data))
    if columns is not None:
        columns = [c for c in columns if c in part.schema_arrow.names]
    return part.read(columns=columns)
