"""`sgarc train --address`: data-parallel training on a Ray cluster (Ray Train).

codec.train's steps (``run_steps``: one loop for a single process and for this) run under
``ray.train.torch.TorchTrainer`` on ``--workers`` workers (DDP over NCCL on GPUs, gloo on
CPUs). The driver samples the images under ``--data`` (folders or fsspec URLs); each
worker reads its share once and keeps one window of each. Rank 0 sends checkpoints and
log records to a small actor that the driver drains, so ``--checkpoint`` and its
``.log.jsonl`` are written where ``sgarc train`` runs and resume works as for a
single-process run. docs/jobs.md ("Training on a cluster") has the details.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from codec.errors import SgarcError
from codec.train import (
    TrainConfig,
    build_model,
    checkpoint_state,
    fix_all_but,
    fix_hyper_synthesis,
    load_checkpoint,
    load_initial,
    memory_format_of,
    param_groups,
    restore,
    rng_state,
    run_steps,
    sampler_for,
    sampler_seed,
    set_rng_state,
)
from pipeline.storage import Storage, StorageError

DEFAULT_SAMPLE = 2000
DEFAULT_WINDOW = 1024
READ_THREADS = 8  # object stores are latency bound; Pillow decodes outside the GIL


@dataclass
class ClusterOptions:
    """Where and how `train_cluster` runs: `address` is "local" (an in-process Ray),
    "auto" or ray://host:10001; `workers` None: one per GPU, or one per node without GPUs;
    `timeout`: seconds before giving up waiting (SgarcError), None: no limit."""

    address: str = "local"
    workers: int | None = None
    sample: int = DEFAULT_SAMPLE
    window: int = DEFAULT_WINDOW
    storage_options: dict | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class WorkerLayout:
    workers: int
    use_gpu: bool
    num_cpus: float  # logical CPUs each worker reserves
    threads: int  # torch threads per worker

    def describe(self) -> str:
        kind = "GPU" if self.use_gpu else "CPU"
        return (f"{self.workers} {kind} worker{'s' if self.workers > 1 else ''} "
                f"({self.threads} torch thread{'s' if self.threads > 1 else ''} each)")


def worker_layout(resources: dict, nodes: int, workers: int | None = None) -> WorkerLayout:
    """The workers and what each reserves, from the cluster's resources (as the pipeline's
    encoder actors: at most one logical CPU each, so the controller and the driver's own
    actors never starve on a small machine; torch threads from the CPUs' real share)."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if workers is not None and workers < 1:
        raise SgarcError(f"--workers must be at least 1, not {workers}")
    if gpus:
        count = workers or gpus
        if count > gpus:
            raise SgarcError(f"--workers {count}: the cluster has {gpus} GPU"
                             f"{'s' if gpus > 1 else ''} (one per worker)")
        return WorkerLayout(count, True, _reserve(cpus / count / 2),
                            max(1, int(cpus // count) // 2))
    count = workers or max(1, nodes)
    return WorkerLayout(count, False, _reserve(cpus / count / 2),
                        max(1, math.floor(cpus / count)))


def _reserve(cpus: float) -> float:
    return max(0.1, min(1.0, math.floor(cpus * 100) / 100))


# ---------------------------------------------------------------------------------------------
# Data: a deterministic sample of the images under the --data roots
# ---------------------------------------------------------------------------------------------


def sample_images(storages: list[Storage], n: int, seed: int) -> tuple[list[tuple[int, str]],
                                                                         int]:
    """(root index, key) of `n` images drawn without replacement from all the images listed
    under the roots (all of them if there are fewer), in listing order; and how many were
    listed. The same roots, n and seed give the same sample."""
    listed = [(i, obj.key) for i, storage in enumerate(storages)
              for obj in storage.list_images()]
    if n < len(listed):
        picked = np.sort(np.random.default_rng(seed).choice(len(listed), n, replace=False))
        return [listed[i] for i in picked], len(listed)
    return listed, len(listed)


def decode_training_image(data: bytes, crop: int, window: int,
                          rng: np.random.Generator) -> np.ndarray | None:
    """The image as uint8 RGB, cut to a random window of at most `window` pixels a side
    (0: whole); None if it is smaller than crop x crop."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if min(w, h) < crop:
            return None
        if window and max(w, h) > window:
            cw, ch = min(w, window), min(h, window)
            left, top = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
            im = im.crop((left, top, left + cw, top + ch))
        return np.asarray(im.convert("RGB"))


def read_images(storages: list[Storage], items: list[tuple[int, int, str]], crop: int,
                window: int, seed: int) -> tuple[list[np.ndarray], int, int]:
    """Read and decode (sample index, root index, key) items: (images, how many were
    smaller than the crop, how many could not be decoded). Storage errors propagate."""

    def one(item: tuple[int, int, str]) -> np.ndarray | Exception | None:
        index, root, key = item
        data = storages[root].read_bytes(key)
        try:
            return decode_training_image(data, crop, window,
                                         np.random.default_rng([seed, index]))
        except Exception as exc:  # a broken or unsupported file: skipped, counted
            return exc

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(items)))) as pool:
        decoded = list(pool.map(one, items))
    images = [a for a in decoded if isinstance(a, np.ndarray)]
    small = sum(a is None for a in decoded)
    return images, small, len(decoded) - len(images) - small


# ---------------------------------------------------------------------------------------------
# The workers
# ---------------------------------------------------------------------------------------------


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: codec.train's steps on a DDP model; rank 0 reports."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    collective = world > 1 and dist.is_initialized()
    cfg = TrainConfig(**config["cfg"])
    device = ray.train.torch.get_device()
    torch.set_num_threads(config["threads"])
    sink = config["sink"]

    def log(line: str) -> None:
        if rank == 0:
            sink.put.remote("log", line)

    def gather(value) -> list:
        if not collective:
            return [value]
        out = [None] * world
        dist.all_gather_object(out, value)
        return out

    state = ray.get(config["state"]) if config["state"] is not None else None
    torch.manual_seed(cfg.seed)  # the same initial weights everywhere (DDP broadcasts them too)
    net = build_model(cfg).to(device).to(memory_format=memory_format_of(cfg))
    step, init_steps = 0, config["init_steps"]
    if state is None and config["initial"] is not None:
        net.load_state_dict(ray.get(config["initial"]))
    opt = torch.optim.Adam(param_groups(net, cfg), lr=cfg.lr)
    if state is not None:
        step, init_steps = restore(net, opt, state)
    fix_hyper_synthesis(net, cfg)
    fix_all_but(net, cfg)

    items = config["items"]
    mine = [(i, *items[i]) for i in range(rank, len(items), world)]
    images, small, unreadable = read_images(config["storages"], mine, cfg.crop,
                                            config["window"], cfg.seed)
    counts = gather((len(images), small, unreadable, len(mine)))
    empty = [r for r, c in enumerate(counts) if c[0] == 0]
    if empty:
        r = empty[0]
        raise ValueError(f"worker {r} has no training image of at least {cfg.crop}x{cfg.crop}"
                         f" among its {counts[r][3]} of the {len(items)} sampled images "
                         f"({counts[r][1]} smaller, {counts[r][2]} unreadable)")
    if rank > 0:  # its own noise; rank 0's is a single process's
        torch.manual_seed(sampler_seed(cfg.seed, step, rank))
    sampler = sampler_for(images, cfg.crop, sampler_seed(cfg.seed, step, rank), device)
    saved = (state or {}).get("rng")
    if saved is not None:
        per_worker = saved.get("workers") or [saved]
        if len(per_worker) == world:  # the same workers: their streams go on exactly
            set_rng_state(per_worker[rank], sampler, device)
        else:
            log(f"the checkpoint's random states are of {len(per_worker)} worker(s), not "
                f"{world}: new crop streams from step {step}")
    total = [sum(c[i] for c in counts) for i in range(3)]
    log(f"training on {total[0]} images of {len(items)} sampled ({total[1]} smaller than "
        f"the crop, {total[2]} unreadable: skipped), {world} workers on {device.type}, "
        f"{cfg.batch_size} crops per worker and step, config {asdict(cfg)}")
    model = ray.train.torch.prepare_model(net)  # DDP when world > 1

    def agree(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return float(t.item())

    def mean_over_workers(means: dict) -> dict:
        keys = list(means)
        t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}

    def save(step: int) -> None:
        rngs = gather(rng_state(sampler, device))
        if rank == 0:
            buf = io.BytesIO()
            torch.save(checkpoint_state(model, opt, step, init_steps, cfg,
                                        {**rngs[0], "workers": rngs}, world), buf)
            ray.get(sink.checkpoint.remote(step, buf.getvalue()))

    def on_record(record: dict) -> None:
        if rank == 0:
            sink.put.remote("record", {**record, "workers": world})

    run_steps(model, opt, sampler, cfg, step, device, save, log, on_record,
              agree=agree if collective else None,
              mean_over_workers=mean_over_workers if collective else None)
    if rank == 0:
        ray.get(sink.flush.remote())  # everything sent has arrived


class _Sink:
    """Rank 0's messages and latest checkpoint, until the driver drains them."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, object]] = []
        self.latest: tuple[int, bytes] | None = None

    def put(self, kind: str, payload) -> None:
        self.messages.append((kind, payload))

    def checkpoint(self, step: int, data: bytes) -> None:
        self.latest = (step, data)

    def flush(self) -> None:
        pass

    def drain(self) -> tuple[list, tuple[int, bytes] | None]:
        out = self.messages, self.latest
        self.messages, self.latest = [], None
        return out


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _connect(address: str) -> bool:
    """Start or join Ray; True when this call started it (and should shut it down)."""
    import ray

    from pipeline.actors import start_ray

    if ray.is_initialized():
        return False
    try:
        start_ray(None if address == "local" else address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SgarcError(f"cannot reach the Ray cluster at {address}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    return True


def _user_error(exc: BaseException) -> BaseException:
    """A worker's user-facing failure (no image large enough, storage) as one line; any
    other failure as it came."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        if isinstance(cause, SgarcError | StorageError | ValueError):
            return SgarcError(str(cause))
    return exc


def train_cluster(cfg: TrainConfig, checkpoint: Path, options: ClusterOptions, log=print,
                  on_record: Callable[[dict], None] | None = None) -> nn.Module:
    """Train (or resume from `checkpoint`) on a Ray cluster; returns the float model (CPU).

    `log` and `on_record` get what codec.train.train gives them (records add "workers").
    Raises SgarcError (or ValueError, as train does) for the user's mistakes.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    state = load_checkpoint(checkpoint, cfg, "cpu")
    model = build_model(cfg)
    init_steps, initial = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        log(f"resumed from {checkpoint} at step {state['step']}")
        if state["step"] >= cfg.steps:
            return model
    elif cfg.init_from:
        init_steps = load_initial(model, cfg.init_from, cfg)
        log(f"initialized from {cfg.init_from} ({init_steps} steps)")
        initial = model.state_dict()
    if options.sample < 1:
        raise SgarcError(f"--sample must be at least 1, not {options.sample}")
    storages = [Storage(url, options.storage_options) for url in cfg.data]
    items, listed = sample_images(storages, options.sample, cfg.seed)
    if not items:
        raise SgarcError(f"no images under {', '.join(s.url for s in storages)}")

    started = _connect(options.address)
    storage_path = tempfile.mkdtemp(prefix="sgarc-train-")
    sink = None
    try:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        lay = worker_layout(ray.cluster_resources(), nodes, options.workers)
        if len(items) < lay.workers:
            raise SgarcError(f"{len(items)} sampled images for {lay.workers} workers: give "
                             "each worker at least one")
        log(f"{lay.describe()}; {len(items)} of {listed} images sampled")
        sink = ray.remote(num_cpus=0, max_restarts=0)(_Sink).remote()
        config = {
            "cfg": asdict(cfg), "threads": lay.threads, "sink": sink,
            "state": ray.put(state) if state is not None else None,
            "initial": ray.put(initial) if initial is not None else None,
            "init_steps": init_steps, "storages": storages, "items": items,
            "window": options.window,
        }
        resources = {"CPU": lay.num_cpus, **({"GPU": 1} if lay.use_gpu else {})}
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=lay.workers, use_gpu=lay.use_gpu,
                                         resources_per_worker=resources,
                                         placement_strategy="SPREAD"),
            run_config=RunConfig(storage_path=storage_path,
                                 name=f"{checkpoint.stem}-{uuid.uuid4().hex[:8]}"))
        _fit(trainer, sink, checkpoint, log, on_record, options.timeout)
    finally:
        if sink is not None:
            ray.kill(sink)
        if started:
            ray.shutdown()
        shutil.rmtree(storage_path, ignore_errors=True)
    final = load_checkpoint(checkpoint, cfg, "cpu")
    if final is not None:
        model.load_state_dict(final["model"])
    return model


def _fit(trainer, sink, checkpoint: Path, log, on_record, timeout: float | None) -> None:
    """trainer.fit() in a thread while this one writes what rank 0 sends."""
    import ray

    outcome: dict = {}

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as exc:
            outcome["error"] = exc

    def deliver() -> None:
        messages, latest = ray.get(sink.drain.remote(), timeout=120)
        for kind, payload in messages:
            if kind == "log":
                log(payload)
            elif on_record is not None:
                on_record(payload)
        if latest is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_bytes(latest[1])
            os.replace(tmp, checkpoint)

    thread = threading.Thread(target=run, name="sgarc-train-fit", daemon=True)
    thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.5)
        deliver()
        if deadline is not None and time.monotonic() > deadline:
            raise SgarcError(f"training did not finish within {timeout:g} s")
    deliver()
    if "error" in outcome:
        raise _user_error(outcome["error"]) from None
