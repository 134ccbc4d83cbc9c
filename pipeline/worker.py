"""Encoding one shard: the work a Ray actor does, kept free of Ray so it can be tested alone.

For each image: read bytes (retried by Storage) -> decode and apply the image policy ->
batched inference by padded size -> the route that meets the owner's policy at the fewest
bytes (codec.routes: learned, jpeg-lossless or original) -> bitstream written atomically ->
one metrics row. Reads
and image decoding run in a small thread pool ahead of the encoder, so storage latency
overlaps compute. A bad image becomes an error row; the shard goes on. The shard's Parquet
part is written last and atomically; if it already exists the shard was committed before
(for example by an actor that died right after) and nothing is redone.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from codec import routes
from codec.api import Codec, EncodeResult, padded_size
from codec.bitstream import parse
from codec.errors import SgarcError
from codec.images import PreparedImage, load_image
from pipeline import sink
from pipeline.plan import Shard
from pipeline.settings import EncodeSettings
from pipeline.storage import ObjectInfo, Storage, StorageError

CRASH_MARKER_ENV = "SGARC_FAULT_CRASH_ON"  # fault injection for tests and chaos drills


@dataclass
class ShardResult:
    shard_id: str
    images: int
    ok: int
    errors: int
    seconds: float
    already_committed: bool = False
    replaced: int = 0  # refinement: bitstreams replaced by a better encoding


class ShardEncoder:
    """Loads the model once; encodes shards of one run."""

    def __init__(self, input_url: str, output_url: str, storage_options: dict | None,
                 settings: EncodeSettings, fingerprint: str, device: str | None = None,
                 batch_size: int | None = None, prefetch: int = 4,
                 torch_threads: int | None = None
                 ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.input = Storage(input_url, storage_options)
        self.output = Storage(output_url, storage_options)
        self.settings = settings
        self.config = settings.inference()
        self.fingerprint = fingerprint
        self.codec = Codec(settings.model_ref, device=device, rate=settings.rate)
        self.policy = settings.policy()
        # the learned attempt's per-image target: explicit, or the floor (variable rate)
        self.target = routes.learned_target(self.policy, settings.target(),
                                            self.codec.lm.variable is not None)
        self.batch_size = batch_size or (8 if self.codec.device.type == "cuda" else 1)
        self.prefetch = prefetch

    def process(self, shard: Shard, run_id: str,
                progress: Callable[[int], None] | None = None) -> ShardResult:
        t0 = time.perf_counter()
        part = sink.part_key(run_id, shard.id)
        if self.output.exists(part):
            return committed_result(self.output, part, shard.id)
        rows: list[dict] = []
        base = {"run_id": run_id, "shard_id": shard.id, "fingerprint": self.fingerprint,
                "model_id": self.codec.model_id, "quality": self.codec.lm.entry.quality,
                "lmbda": self.codec.lm.entry.lmbda, "method": self.config.method,
                "iterations": 0 if self.config.method == "amortized" else
                self.config.iterations, "device": str(self.codec.device)}
        buckets: dict[tuple[int, int], list[tuple[ObjectInfo, PreparedImage, bytes]]] = \
            defaultdict(list)
        refused = shard.refused or {}
        for ref in shard.images:
            if ref.key in refused:  # the plan's decision: a row saying why, nothing read
                rows.append({**base, **self._source(ref), "status": "error",
                             "error_stage": "plan", "error": refused[ref.key],
                             "timestamp": sink.now()})
                _tick(progress)
        todo = [ref for ref in shard.images if ref.key not in refused]
        for ref, prepared, source, failure in self._prepared(todo):
            if failure is not None:
                rows.append({**base, **self._source(ref), **failure, "status": "error",
                             "timestamp": sink.now()})
                _tick(progress)
                continue
            self._maybe_crash(ref.key)
            bucket = buckets[padded_size(prepared)]
            bucket.append((ref, prepared, source))
            if len(bucket) >= self.batch_size:
                rows += self._encode(bucket, base, progress, shard)
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                rows += self._encode(bucket, base, progress, shard)
        self.output.write_atomic(part, sink.part_bytes(rows))
        errors = sum(r["status"] == "error" for r in rows)
        return ShardResult(shard.id, len(rows), len(rows) - errors, errors,
                           time.perf_counter() - t0,
                           replaced=sum(r.get("replaced") is True for r in rows))

    # -- reading ahead

    def _prepared(self, refs: list[ObjectInfo]
                  ) -> Iterator[tuple[ObjectInfo, PreparedImage | None, bytes | None,
                                      dict | None]]:
        """Images in order, read and decoded up to `prefetch` ahead in threads."""
        with ThreadPoolExecutor(max_workers=max(1, self.prefetch),
                                thread_name_prefix="sgarc-read") as pool:
            pending: list[tuple[ObjectInfo, Future]] = []
            it = iter(refs)
            for ref in it:
                pending.append((ref, pool.submit(self._read_one, ref)))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                ref, fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._read_one, nxt)))
                yield (ref, *fut.result())

    def _read_one(self, ref: ObjectInfo
                  ) -> tuple[PreparedImage | None, bytes | None, dict | None]:
        """(image, the source file's bytes: the lossless routes store them, failure)."""
        try:
            data = self.input.read_bytes(ref.key)
        except StorageError as exc:
            return None, None, {"error_stage": "read", "error": str(exc)}
        try:
            s = self.settings
            image = load_image(data, alpha=s.alpha, depth=s.depth, max_pixels=s.max_pixels,
                               metadata=s.metadata, name=posixpath.basename(ref.key))
        except SgarcError as exc:
            return None, None, {"error_stage": "decode", "error": str(exc)}
        except MemoryError:
            return None, None, {"error_stage": "decode",
                                "error": "out of memory decoding the image"}
        return image, data, None

    # -- encoding and writing

    def _encode(self, bucket, base: dict, progress, shard: Shard) -> list[dict]:
        images = [p for _, p, _ in bucket]
        results: list[EncodeResult | Exception] | None = None
        if self.target is None:  # with a target each image finds its own rate point
            try:
                results = list(self.codec.encode_batch(images, self.config))
            except Exception:  # isolate the image that fails: retry one by one
                results = None
        if results is None:
            results = [self._encode_one(im) for im in images]
        rows = []
        for (ref, prepared, source), res in zip(bucket, results, strict=True):
            routed = res if isinstance(res, Exception) else self._route(prepared, source, res)
            rows.append(self._row(ref, prepared, routed, base, _stored(shard, ref.key)))
            _tick(progress)
        return rows

    def _route(self, prepared: PreparedImage, source: bytes, learned: EncodeResult
               ) -> routes.Routed | Exception:
        try:
            return routes.choose(prepared, source, learned, self.policy, learned.seconds)
        except Exception as exc:  # any failure becomes an error row
            return exc

    def _encode_one(self, image: PreparedImage) -> EncodeResult | Exception:
        try:
            if self.target is None:
                return self.codec.encode(image, self.config)
            return self.codec.encode_to_target(image, self.target, self.config)
        except Exception as exc:  # any failure becomes an error row
            return exc

    def _row(self, ref: ObjectInfo, prepared: PreparedImage,
             routed: routes.Routed | Exception, base: dict,
             stored: routes.Stored | None = None) -> dict:
        info = prepared.info
        row = {**base, **self._source(ref), "source_format": info.format,
               "source_mode": info.mode, "width": info.width, "height": info.height,
               "timestamp": sink.now(), **_metadata_columns(prepared),
               "min_psnr": self.policy.min_psnr}
        if isinstance(routed, Exception):
            return {**row, "status": "error", "error_stage": "encode",
                    "error": f"{type(routed).__name__}: {routed}"}
        key = sink.bitstream_key(ref.key)
        replaced = None
        if stored is not None:  # refinement: keep the stored stream unless beaten
            replaced = routes.improves(routed, stored, self.policy)
            row.update(previous_rd_loss=stored.rd_loss, replaced=replaced)
        res = routed.learned
        if routed.route != "learned":  # the learned columns describe a learned stream
            row.update(metadata_bytes=len(parse(routed.data).sections.get("META", b"")),
                       metadata_dropped=None)
        if replaced is not False:
            try:
                self.output.write_atomic(key, routed.data)
            except StorageError as exc:
                return {**row, "status": "error", "error_stage": "write", "error": str(exc)}
        else:
            key = None  # the attempt is recorded, the stored stream stays
        row.update(status="ok", bitstream_key=key, bitstream_bytes=len(routed.data),
                   bitstream_sha256=hashlib.sha256(routed.data).hexdigest(), bpp=routed.bpp,
                   psnr=routed.psnr, route=routed.route, floor_met=routed.floor_met,
                   encode_seconds=routed.seconds)
        if res is not None:  # the learned attempt, whichever route won
            row.update(learned_bytes=len(res.data), learned_psnr=res.psnr,
                       iterations_used=res.iterations, rate=res.rate, layout=res.layout,
                       lmbda=res.lmbda, target=res.target, target_value=res.target_value,
                       target_met=res.target_met)
        if routed.route == "learned":
            row.update(estimated_bits=res.estimated_bits, payload_bits=res.payload_bits,
                       amortized_bpp=res.amortized_bpp, amortized_psnr=res.amortized_psnr,
                       rd_loss=res.rd_loss, amortized_rd_loss=res.amortized_rd_loss)
        return row

    def _source(self, ref: ObjectInfo) -> dict:
        return sink.source_columns(ref.key, source_url(self.input, ref.key), ref.size,
                                   ref.version)

    def _maybe_crash(self, key: str) -> None:
        """Fault injection: die once, hard, when reaching a key containing the marker."""
        spec = os.environ.get(CRASH_MARKER_ENV)
        if not spec:
            return
        needle, _, flag = spec.partition("@")
        if needle in key and flag and not Path(flag).exists():
            Path(flag).touch()
            os._exit(17)


def committed_result(output: Storage, part: str, shard_id: str) -> ShardResult:
    """The counts of a shard committed before (by an attempt that died after its write)."""
    table = sink.read_part(output.read_bytes(part), ["status", "replaced"])
    errors = table["status"].to_pylist().count("error")
    replaced = (table["replaced"].to_pylist().count(True)
                if "replaced" in table.column_names else 0)
    return ShardResult(shard_id, table.num_rows, table.num_rows - errors, errors, 0.0,
                       already_committed=True, replaced=replaced)


def source_url(storage: Storage, key: str) -> str | None:
    """The source's URL, or None for a key Storage refuses (a backslash in a local name:
    such images are refused at planning, and their error row must still be written)."""
    try:
        return storage.url_of(key)
    except ValueError:
        return None


def _stored(shard: Shard, key: str) -> routes.Stored | None:
    """What the archive holds for an image in a refinement shard (None: not refinement).
    Plans from before routes existed have the RD loss only: a learned stream."""
    if shard.baseline is None:
        return None
    info = (shard.stored or {}).get(key, {})
    return routes.Stored(route=info.get("route") or "learned", bytes=info.get("bytes"),
                         psnr=info.get("psnr"), rd_loss=shard.baseline.get(key))


def _metadata_columns(prepared: PreparedImage) -> dict:
    """metadata_bytes (what the META section holds), has_icc, metadata_dropped."""
    meta = prepared.metadata
    if meta is None:
        return {"metadata_bytes": 0, "has_icc": False, "metadata_dropped": None}
    return {"metadata_bytes": meta.packed_size() if meta.fields() else 0,
            "has_icc": meta.icc is not None or "icc" in meta.dropped,
            "metadata_dropped": ",".join(meta.dropped) or None}


def _tick(progress) -> None:
    if progress is not None:
        progress(1)
