"""S3 Inventory reports as a run's input: what AWS writes daily for buckets too large to list.

A report is a ``manifest.json`` naming data files (gzip CSV, or Parquet) in the
destination bucket; each row is one object with its key, size and ETag (docs:
"Amazon S3 Inventory", the manifest's ``fileFormat``, ``fileSchema`` and ``files``). The
ETag is what a listing reports as the version, so a run fed by an inventory skips the same
images as one fed by a listing. CSV keys are URL-encoded, Parquet keys are not. Only images
are kept (the listing's rule, `is_image_key`); rows of other buckets, outside the
root's prefix, of delete markers or of old versions are left
out; the data files are read one at a time, in batches.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from pipeline.storage import ObjectInfo, Storage, StorageError, is_image_key

_BATCH = 65_536


def inventory_objects(root: Storage, manifest_url_or_key: str) -> Iterator[ObjectInfo]:
    """The objects under `root` listed by the inventory report `manifest_url_or_key`."""
    manifest = json.loads(root._read_manifest(manifest_url_or_key))
    where = root._redact(str(manifest_url_or_key))
    try:
        fmt = manifest["fileFormat"].lower()
        files = [f["key"] for f in manifest["files"]]
        bucket = manifest["destinationBucket"].rsplit(":", 1)[-1]
    except (KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"inventory {where}: not an S3 Inventory manifest ({exc!r} missing)",
                           op="manifest", target=where) from None
    source = manifest.get("sourceBucket")
    if fmt not in ("csv", "parquet"):
        raise StorageError(f"inventory {where}: fileFormat {manifest['fileFormat']!r}; CSV and "
                           "Parquet reports are read (ask AWS for one of those)",
                           op="manifest", target=where)
    schema = [c.strip() for c in manifest.get("fileSchema", "").split(",") if c.strip()]
    own_bucket, _, prefix = root.full_path("").partition("/")
    if source is not None and root.protocol == "s3" and source != own_bucket:
        return
    prefix = prefix + "/" if prefix else ""
    data = Storage(f"{root.protocol}://{bucket}", root.storage_options)
    for key in files:
        raw = data.read_bytes(key)
        tables = (_csv_batches(raw, schema, where) if fmt == "csv"
                  else pq.ParquetFile(io.BytesIO(raw)).iter_batches(batch_size=_BATCH))
        for batch in tables:
            yield from _objects(batch, prefix, decode=fmt == "csv")


def _csv_batches(raw: bytes, schema: list[str], where: str) -> Iterator[pa.RecordBatch]:
    if not schema:
        raise StorageError(f"inventory {where}: a CSV report needs its fileSchema",
                           op="manifest", target=where)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    names = [_column(c) for c in schema]
    reader = pcsv.open_csv(io.BytesIO(raw), read_options=pcsv.ReadOptions(
        column_names=names, block_size=1 << 22), convert_options=pcsv.ConvertOptions(
        column_types={n: pa.string() for n in names}))
    yield from reader


def _column(name: str) -> str:
    """CSV schema names ("Key", "ETag", "IsLatest") as Parquet reports name them."""
    if name == "ETag":
        return "e_tag"
    out = ""
    for i, c in enumerate(name):
        if c.isupper() and i and not name[i - 1].isupper():
            out += "_"
        out += c.lower()
    return out


def _objects(batch: pa.RecordBatch, prefix: str, decode: bool) -> Iterator[ObjectInfo]:
    cols = batch.schema.names
    keys = batch.column("key").to_pylist()
    sizes = batch.column("size").to_pylist() if "size" in cols else [None] * len(keys)
    etags = batch.column("e_tag").to_pylist() if "e_tag" in cols else [""] * len(keys)
    latest = batch.column("is_latest").to_pylist() if "is_latest" in cols else None
    deleted = (batch.column("is_delete_marker").to_pylist()
               if "is_delete_marker" in cols else None)
    for i, key in enumerate(keys):
        if key is None or (latest is not None and str(latest[i]).lower() == "false"):
            continue
        if deleted is not None and str(deleted[i]).lower() == "true":
            continue
        if decode:
            key = unquote_plus(key)
        if not key.startswith(prefix) or not is_image_key(key[len(prefix):]):
            continue
        yield ObjectInfo(key[len(prefix):], int(sizes[i] or 0), str(etags[i] or "").strip('"'))
