"""The Ray side of a run: encoder actors that hold a model and process shards.

Following Ray's batch-inference pattern: the model loads once in `__init__`, resources
are declared on the actor, and the driver only orchestrates. With GPUs, one actor per GPU
(`num_gpus=1`); without, CPU actors with fractional CPU reservations (a whole CPU per actor
can starve other work and deadlock a 2-core machine) and an explicit torch thread count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import ray

from pipeline.plan import Shard
from pipeline.worker import ShardEncoder, ShardResult


def start_ray(address: str | None = None) -> None:
    """Connect to `address`, or start the embedded local Ray, so that only sgarc speaks.

    Ray keeps its own logs in its session folder (/tmp/ray/session_latest/logs by default;
    `ray.init(_temp_dir=...)` moves it); the terminal gets no worker output and none of
    Ray's notices. The one Ray prints on every new local cluster, that it enabled token
    authentication, is silenced: the embedded cluster keeps Ray's default (token
    authentication on), there is just nothing for the user to do about it.
    """
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)


@ray.remote(max_restarts=0, max_concurrency=1)
class EncoderActor:
    def __init__(self, *args, **kwargs) -> None:
        self.encoder = ShardEncoder(*args, **kwargs)

    def ready(self) -> str:
        return str(self.encoder.codec.device)

    def process(self, shard: Shard, run_id: str) -> ShardResult:
        return self.encoder.process(shard, run_id)


@dataclass(frozen=True)
class ActorLayout:
    count: int
    num_gpus: float
    num_cpus: float
    torch_threads: int

    def describe(self) -> str:
        kind = "GPU" if self.num_gpus else "CPU"
        return (f"{self.count} {kind} encoder actor{'s' if self.count > 1 else ''}"
                f" ({self.torch_threads} torch thread{'s' if self.torch_threads > 1 else ''}"
                " each)")


def layout(resources: dict, actors: int | None = None) -> ActorLayout:
    """How many actors, and what each reserves, from the cluster's resources."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus:
        count = min(actors or gpus, gpus)
        threads = max(1, int(cpus // count) // 2)
        return ActorLayout(count, 1.0, min(1.0, cpus / count / 2), threads)
    count = actors or max(1, int(cpus) // 4)  # a few threads per actor beat many actors
    threads = max(1, math.floor(cpus / count))
    return ActorLayout(count, 0.0, max(0.1, min(1.0, cpus / count / 2)), threads)
