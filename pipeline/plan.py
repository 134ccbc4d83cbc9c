"""Planning a run: which images to encode, cut into deterministic shards, stored with the job.

An image is skipped when an earlier run already encoded it successfully with the same
fingerprint (settings + model) from the same source bytes (key, size, version). So reruns
and nightly runs only do new or changed work. An image whose key the decode service could
not take (a newline in its name, ...) is refused here: its shard records why, and the
worker writes an error row (stage "plan") without reading it. Shard ids hash the
fingerprint and the images they hold, so the same work always gets the same id, and a
shard is done when its Parquet part exists. The plan is stored under
`<out>/_jobs/<run-id>/plan.json`; an interrupted run resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import sink
from pipeline.keys import key_problem
from pipeline.storage import ObjectInfo, Storage

DONE_COLUMNS = ["source_key", "source_bytes", "source_version", "fingerprint", "status"]


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
    run_id: str
    input_url: str
    output_url: str
    fingerprint: str
    settings: dict
    shards: list[Shard]
    skipped: int = 0  # images already done by earlier runs
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    mode: str = "encode"  # "encode": new and changed images; "refine": see make_refine_plan

    @property
    def num_images(self) -> int:
        return sum(len(s.images) for s in self.shards)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        d["shards"] = [Shard.from_json(s) for s in d["shards"]]
        return cls(**d)


def plan_key(run_id: str) -> str:
    return f"_jobs/{run_id}/plan.json"


def summary_key(run_id: str) -> str:
    return f"_jobs/{run_id}/summary.json"


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _metric_tables(output: Storage, columns: list[str]) -> Iterator[pa.Table]:
    """Each metrics part with those of `columns` it has (older parts may lack newer ones)."""
    for key in output.list_keys("metrics", ".parquet"):
        yield sink.read_part(output.read_bytes(key), columns)


def done_images(output: Storage, fingerprint: str) -> set[tuple[str, int, str]]:
    """(key, size, version) of every image already encoded successfully with `fingerprint`."""
    done: set[tuple[str, int, str]] = set()
    for table in _metric_tables(output, DONE_COLUMNS):
        table = table.filter(pc.and_(pc.equal(table["fingerprint"], fingerprint),
                                     pc.equal(table["status"], "ok")))
        done.update(zip(table["source_key"].to_pylist(), table["source_bytes"].to_pylist(),
                        table["source_version"].to_pylist(), strict=True))
    return done


def shard_id(fingerprint: str, images: list[ObjectInfo]) -> str:
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


def make_plan(images: list[ObjectInfo], input_url: str, output: Storage, settings: dict,
              fingerprint: str, shard_size: int, run_id: str | None = None) -> Plan:
    """Skip what is done, cut the rest into shards of `shard_size` in key order."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    done = done_images(output, fingerprint)
    todo = sorted((im for im in images if (im.key, im.size, im.version) not in done),
                  key=lambda im: im.key)
    chunks = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
    shards = []
    for chunk in chunks:
        refused = {im.key: reason for im in chunk if (reason := refusal(im.key)) is not None}
        shards.append(Shard(shard_id(fingerprint, chunk), chunk, refused=refused or None))
    return Plan(run_id or new_run_id(), input_url, output.url, fingerprint, settings, shards,
                skipped=len(images) - len(todo))


REFINE_COLUMNS = ["source_key", "source_bytes", "source_version", "model_id", "method",
                  "iterations", "status", "rd_loss", "timestamp", "replaced", "route",
                  "bitstream_bytes", "psnr"]


def _metric_rows(output: Storage, columns: list[str]) -> list[dict]:
    return [row for table in _metric_tables(output, columns) for row in table.to_pylist()]


def make_refine_plan(images: list[ObjectInfo], input_url: str, output: Storage,
                     settings: dict, fingerprint: str, shard_size: int,
                     max_images: int | None = None, run_id: str | None = None) -> Plan:
    """Images whose stored encoding is below the target (method, iterations) of `settings`.

    Only images with a stored encoding of the same source bytes and model qualify (new or
    changed images belong to a coverage run). An image is done once any run reached the
    target for it, whether or not that run replaced the bitstream. Candidates with the
    highest stored RD loss come first (most to gain), up to `max_images`.
    """
    current = {(im.key, im.size, im.version): im for im in images}
    stored: dict[tuple, dict] = {}
    reached: set[tuple] = set()
    for row in _metric_rows(output, REFINE_COLUMNS):
        ident = (row["source_key"], row["source_bytes"], row["source_version"])
        if (row["status"] != "ok" or ident not in current
                or row["model_id"] != settings["model"]):
            continue
        if (row["method"] == settings["method"]
                and (row["iterations"] or 0) >= settings["iterations"]):
            reached.add(ident)
        written = row.get("replaced") is not False  # this row's bitstream was stored
        if written and (ident not in stored or row["timestamp"] > stored[ident]["timestamp"]):
            stored[ident] = row
    todo = sorted((ident for ident in stored if ident not in reached),
                  key=lambda i: (-(stored[i]["rd_loss"] or 0.0), i[0]))
    if max_images is not None:
        todo = todo[:max_images]
    shards = []
    for start in range(0, len(todo), shard_size):
        idents = todo[start:start + shard_size]
        chunk = [current[i] for i in idents]
        baseline = {current[i].key: stored[i]["rd_loss"] for i in idents}
        held = {current[i].key: {"route": stored[i].get("route") or "learned",
                                 "bytes": stored[i].get("bitstream_bytes"),
                                 "psnr": stored[i].get("psnr")} for i in idents}
        shards.append(Shard(shard_id("refine:" + fingerprint, chunk), chunk, baseline,
                            stored=held))
    return Plan(run_id or new_run_id(), input_url, output.url, fingerprint, settings, shards,
                skipped=len(images) - len(todo), mode="refine")


def unfinished_plan(output: Storage, input_url: str, fingerprint: str,
                    mode: str = "encode") -> Plan | None:
    """The newest stored plan of this input and fingerprint whose run has no summary yet."""
    candidates = []
    for key in output.list_keys("_jobs", "plan.json"):
        run_id = key.split("/")[1]
        if output.exists(summary_key(run_id)):
            continue
        plan = Plan.from_json(output.read_bytes(key))
        if (plan.input_url, plan.fingerprint, plan.mode) == (input_url, fingerprint, mode):
            candidates.append(plan)
    return max(candidates, key=lambda p: p.created) if candidates else None
