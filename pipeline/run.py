"""The driver of a recompression run: plan, start actors, hand out shards, survive faults.

    summary = run("photos/", "archive/", EncodeSettings(method="amortized"))

Embedded default: an in-process local Ray; pass `address` to use an existing cluster.
Faults: a shard whose actor dies is retried on a fresh actor (up to `max_attempts`; after
that its images get error rows, so every input still has exactly one row); a shard is
committed by one atomic Parquet write, so a retry after a late death finds the part and
does nothing. An interrupted run resumes from its stored plan when started again with the
same input and settings (or `run_id`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline import plan as planning
from pipeline import sink
from pipeline.actors import EncoderActor, layout, start_ray
from pipeline.plan import Plan, Shard
from pipeline.settings import EncodeSettings
from pipeline.storage import ObjectInfo, Storage
from pipeline.worker import ShardResult, committed_result, source_url


@dataclass
class RunOptions:
    shard_size: int = 16
    actors: int | None = None  # None: one per GPU, else CPU actors sized to the machine
    address: str | None = None  # Ray cluster address; None: in-process local Ray
    device: str | None = None  # torch device inside actors; None: cuda when present
    batch_size: int | None = None  # images of one padded size encoded together; None: 8 on
    # CUDA, 1 on CPU (measured: batches of 4 are ~15% slower per image on a CPU)
    prefetch: int = 4  # images read and decoded ahead of the encoder
    max_attempts: int = 3
    run_id: str | None = None  # resume (or name) this run
    manifest: str | None = None  # list of keys instead of a listing of the input
    progress: bool = True
    actor_env: dict[str, str] = field(default_factory=dict)  # env vars for actor processes
    # Filters the listing (extensions, include/exclude patterns, sizes) before planning.
    image_filter: Callable[[list[ObjectInfo]], list[ObjectInfo]] | None = None
    dry_run: bool = False  # plan and count only: no Ray, no plan, no bitstreams written
    # Merge the run's parts into a few large files when it wrote at least this many
    # (sink.compact; `sgarc metrics compact` does it later for any finished run).
    compact_min_parts: int = 256


@dataclass
class RunSummary:
    """What one call of run/refine did. A resumed run counts the shards committed before
    the interruption as skipped, like the work of earlier runs: ``images + skipped`` is
    always the number of images considered, and images/s is this call's rate."""

    run_id: str
    images: int  # rows written by this call
    ok: int
    errors: int
    skipped: int  # done by earlier runs with the same settings, or before an interruption
    shards: int  # shards this call ran
    retried_shards: int
    seconds: float
    resumed: bool
    output_url: str
    mode: str = "encode"
    replaced: int = 0  # refinement runs: bitstreams replaced by a better encoding
    dry_run: bool = False  # images and shards are what a run would do; nothing was written

    def line(self) -> str:
        if self.dry_run:
            return (f"{self.mode} dry run: would encode {self.images} images in "
                    f"{self.shards} shards, skip {self.skipped} (done with the same "
                    f"settings); planned in {self.seconds:.1f} s, nothing written")
        rate = self.images / self.seconds if self.seconds else 0.0
        refined = f", {self.replaced} replaced" if self.mode == "refine" else ""
        return (f"{self.mode} run {self.run_id}: {self.images} images ({self.ok} ok"
                f"{refined}, {self.errors} errors), {self.skipped} skipped, {self.shards} shards, "
                f"{self.seconds:.1f} s ({rate:.2f} images/s){' [resumed]' if self.resumed else ''}")


def run(input_url: str, output_url: str, settings: EncodeSettings,
        options: RunOptions | None = None, storage_options: dict | None = None) -> RunSummary:
    """Encode new and changed images (a coverage run)."""
    return _run(input_url, output_url, settings, options, storage_options, "encode", None)


def refine(input_url: str, output_url: str, settings: EncodeSettings,
           options: RunOptions | None = None, storage_options: dict | None = None,
           max_images: int | None = None) -> RunSummary:
    """Re-encode with `settings` (typically SGA) the images whose stored encoding is below
    them, replacing a bitstream only when the RD loss improved. Metrics keep both runs."""
    return _run(input_url, output_url, settings, options, storage_options, "refine",
                max_images)


def _run(input_url: str, output_url: str, settings: EncodeSettings,
         options: RunOptions | None, storage_options: dict | None, mode: str,
         max_images: int | None) -> RunSummary:
    options = options or RunOptions()
    t0 = time.perf_counter()
    source = Storage(input_url, storage_options)
    output = Storage(output_url, storage_options)
    plan, resumed = _load_or_make_plan(source, output, settings, options, mode, max_images)
    # One listing of the run's metrics folder says which shards are committed.
    committed = sink.committed_shards(output, plan.run_id) if resumed else set()
    done_before = (sum(n for sid, n in plan.shard_sizes(output) if sid in committed)
                   if committed else 0)
    pending_images = plan.num_images - done_before
    pending_shards = plan.num_shards - len(committed)
    if options.dry_run:
        return RunSummary(plan.run_id, pending_images, 0, 0, plan.skipped + done_before,
                          pending_shards, 0, time.perf_counter() - t0, resumed, output.url,
                          plan.mode, dry_run=True)
    counts = _Counts()
    if pending_shards:
        pending = (s for s in plan.iter_shards(output) if s.id not in committed)
        _execute(plan, pending, pending_shards, pending_images, source, output, settings,
                 options, storage_options, counts)
    if counts.shards >= options.compact_min_parts:
        sink.compact(output, plan.run_id)
    summary = RunSummary(plan.run_id, counts.ok + counts.errors, counts.ok, counts.errors,
                         plan.skipped + done_before, counts.shards, counts.retried,
                         time.perf_counter() - t0, resumed, output.url, plan.mode,
                         counts.replaced)
    output.write_atomic(planning.summary_key(plan.run_id),
                        json.dumps(asdict(summary), indent=1).encode())
    return summary


def _load_or_make_plan(source: Storage, output: Storage, settings: EncodeSettings,
                       options: RunOptions, mode: str = "encode",
                       max_images: int | None = None) -> tuple[Plan, bool]:
    fingerprint = settings.fingerprint()
    if options.run_id and output.exists(planning.plan_key(options.run_id)):
        plan = Plan.from_json(output.read_bytes(planning.plan_key(options.run_id)))
        if (plan.fingerprint, plan.mode) != (fingerprint, mode):
            raise ValueError(f"run {options.run_id} was planned with other settings (a "
                             f"{plan.mode} run, fingerprint {plan.fingerprint}; now a {mode} "
                             f"run, fingerprint {fingerprint})")
        return plan, True
    if options.run_id is None:
        plan = planning.unfinished_plan(output, source.url, fingerprint, mode)
        if plan is not None:
            return plan, True
    images = (source.iter_manifest(options.manifest) if options.manifest
              else source.iter_images())
    if options.image_filter is not None:
        images = _filtered(images, options.image_filter)
    write = not options.dry_run
    if mode == "refine":
        plan = planning.make_refine_plan(images, source.url, output, settings.resolved(),
                                         fingerprint, options.shard_size, max_images,
                                         options.run_id, write=write)
    else:
        plan = planning.make_plan(images, source.url, output, settings.resolved(),
                                  fingerprint, options.shard_size, options.run_id, write=write,
                                  also_done=settings.superseded_fingerprints())
    return plan, False


def _filtered(images: Iterable[ObjectInfo],
              keep: Callable[[list[ObjectInfo]], list[ObjectInfo]],
              batch: int = 10_000) -> Iterator[ObjectInfo]:
    """The listing through `keep` (a filter over lists), a batch at a time."""
    chunk: list[ObjectInfo] = []
    for im in images:
        chunk.append(im)
        if len(chunk) >= batch:
            yield from keep(chunk)
            chunk = []
    yield from keep(chunk)


@dataclass
class _Counts:
    """What this call did, from the shards' results (no part is read back)."""

    shards: int = 0
    ok: int = 0
    errors: int = 0
    replaced: int = 0
    retried: int = 0

    def add(self, result: ShardResult) -> None:
        self.shards += 1
        self.ok += result.ok
        self.errors += result.errors
        self.replaced += result.replaced


def _execute(plan: Plan, pending: Iterator[Shard], shards: int, images: int,
             source: Storage, output: Storage, settings: EncodeSettings,
             options: RunOptions, storage_options, counts: _Counts) -> None:
    """Hand the pending shards to the actors, pulling the next one from the manifests only
    when an actor is free: at most one shard per actor in flight, plus retries."""
    started_ray = not ray.is_initialized()
    if not started_ray and options.address:
        warnings.warn(f"Ray is already initialized in this process; using that cluster, "
                      f"not address={options.address!r}", stacklevel=3)
    if started_ray:
        start_ray(options.address)
    lay = layout(ray.cluster_resources(), options.actors)
    lay = type(lay)(min(lay.count, shards), lay.num_gpus, lay.num_cpus, lay.torch_threads)
    actor_args = (source.url, output.url, storage_options, settings, plan.fingerprint)
    actor_kwargs = {"device": options.device, "batch_size": options.batch_size,
                    "prefetch": options.prefetch, "torch_threads": lay.torch_threads}
    actor_options = {"num_cpus": lay.num_cpus, "num_gpus": lay.num_gpus,
                     "scheduling_strategy": "SPREAD"}
    if options.actor_env:
        actor_options["runtime_env"] = {"env_vars": dict(options.actor_env)}

    def new_actor():
        return EncoderActor.options(**actor_options).remote(*actor_args, **actor_kwargs)

    actors = [new_actor() for _ in range(lay.count)]
    retries: deque[tuple[Shard, int]] = deque()
    inflight: dict = {}
    free = list(range(len(actors)))
    progress = _Progress(images, options.progress, f"run {plan.run_id}: {lay.describe()}")

    def next_shard() -> tuple[Shard, int] | None:
        if retries:
            return retries.popleft()
        shard = next(pending, None)
        return None if shard is None else (shard, 1)

    def done(result: ShardResult) -> None:
        counts.add(result)
        progress.done(result)

    try:
        while True:
            while free and (work := next_shard()) is not None:
                i = free.pop()
                shard, attempt = work
                inflight[actors[i].process.remote(shard, plan.run_id)] = (i, shard, attempt)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                i, shard, attempt = inflight.pop(ref)
                try:
                    done(ray.get(ref, timeout=60))
                except (RayActorError, RayTaskError) as exc:
                    actors[i] = new_actor() if isinstance(exc, RayActorError) else actors[i]
                    if attempt < options.max_attempts:
                        counts.retried += 1
                        retries.append((shard, attempt + 1))
                    else:
                        done(_give_up(source, output, plan, shard, attempt, exc))
                free.append(i)
    finally:
        progress.close()
        for a in actors:
            ray.kill(a)
        if started_ray:
            ray.shutdown()


def _give_up(source: Storage, output: Storage, plan: Plan, shard: Shard, attempts: int,
             exc: Exception) -> ShardResult:
    """After the last attempt: one error row per image, unless a late attempt committed."""
    part = sink.part_key(plan.run_id, shard.id)
    if output.exists(part):
        return committed_result(output, part, shard.id)
    reason = f"shard failed {attempts} times: {type(exc).__name__}: {str(exc)[:500]}"
    s = plan.settings
    rows = [{**sink.source_columns(im.key, source_url(source, im.key), im.size, im.version),
             "run_id": plan.run_id, "shard_id": shard.id, "fingerprint": plan.fingerprint,
             "model_id": s["model"], "quality": s["quality"], "lmbda": s["lmbda"],
             "method": s["method"], "iterations": s["iterations"],
             "timestamp": sink.now(), "status": "error", "error_stage": "worker",
             "error": reason} for im in shard.images]
    output.write_atomic(part, sink.part_bytes(rows))
    n = len(shard.images)
    return ShardResult(shard.id, n, 0, n, 0.0)


class _Progress:
    """Driver console progress: images/s, ETA and failures (tqdm)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled,
                        dynamic_ncols=True)
        self.failures = 0

    def done(self, result: ShardResult) -> None:
        self.failures += result.errors
        self.bar.set_postfix(failures=self.failures, refresh=False)
        self.bar.update(result.images)

    def close(self) -> None:
        self.bar.close()
