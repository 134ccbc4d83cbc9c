"""Pipeline throughput against a bare loop over the same images, in one run.

Both sides use the same codec settings (amortized inference, CPU, the same torch thread
count) on the same images: the bare loop reads each file, prepares it, encodes it and
writes the bitstream; the pipeline does the same through planning, Ray actors, storage
and Parquet. Ray is started before timing (a cluster is long-lived); actor start-up and
model loading are inside the pipeline's time.

Each side runs on N and on 3N images. Reported: images/s end to end at 3N (fixed costs
included: actor start-up, model load, planning, first-inference warm-up) and the marginal
rate 2N / (T(3N) - T(N)), the steady-state throughput that decides an archive-scale run,
where fixed costs vanish. Both ratios are printed; the target (>= 0.85) is for the
marginal one.

    python bench/pipeline_overhead.py [--images 48] [--repeats 2] [--source DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

VAL_DIR = ROOT.parent / "shared" / "data" / "bsds500" / "val"


def make_inputs(folder: Path, count: int, source: Path | None) -> str:
    """`count` JPEGs: crops of the val photos when present, else of scikit-image samples."""
    files = sorted(source.glob("*.jpg")) if source and source.is_dir() else []
    if files:
        photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        origin = str(source)
    else:
        from skimage import data
        photos = [data.astronaut(), data.coffee(), data.chelsea()]
        origin = "scikit-image samples"
    folder.mkdir(parents=True)
    for i in range(count):
        p = photos[i % len(photos)]
        h, w = min(320, p.shape[0]), min(448, p.shape[1])
        Image.fromarray(p[:h, :w]).save(folder / f"img{i:04d}.jpg", quality=95)
    return origin


def bare_loop(folder: Path, out: Path, model, threads: int) -> float:
    """Seconds for a plain loop: read, prepare, encode, write."""
    from codec.api import Codec
    from codec.images import load_image
    from codec.inference import InferenceConfig

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    codec = Codec(model, device="cpu")
    cfg = InferenceConfig(method="amortized")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.jpg"))
    for f in files:
        result = codec.encode(load_image(f.read_bytes()), cfg)
        (out / f"{f.name}.sga").write_bytes(result.data)
    return time.perf_counter() - t0


def pipeline(folder: Path, out: Path, model, shard_size: int) -> float:
    """Seconds for `sgarc run` on the same folder (Ray already up)."""
    from pipeline.run import RunOptions, run
    from pipeline.settings import EncodeSettings

    t0 = time.perf_counter()
    summary = run(str(folder), str(out), EncodeSettings(model=model, method="amortized"),
                  RunOptions(shard_size=shard_size, device="cpu", progress=False))
    assert summary.errors == 0 and summary.skipped == 0
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--quality", type=int, default=None)
    ap.add_argument("--source", type=Path, default=VAL_DIR)
    args = ap.parse_args()

    import ray

    from pipeline.actors import layout

    work = Path(tempfile.mkdtemp(prefix="sgarc-bench-"))
    try:
        n = args.images
        origin = make_inputs(work / "small", n, args.source)
        make_inputs(work / "large", 3 * n, args.source)
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - t0
        threads = layout(ray.cluster_resources()).torch_threads
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeats):
            for size in ("small", "large"):
                times.setdefault(("bare", size), []).append(
                    bare_loop(work / size, work / f"bare-{size}{r}", args.quality, threads))
                times.setdefault(("pipeline", size), []).append(
                    pipeline(work / size, work / f"out-{size}{r}", args.quality,
                             args.shard_size))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    rate = {side: 3 * n / best[(side, "large")] for side in ("bare", "pipeline")}
    marginal = {side: 2 * n / (best[(side, "large")] - best[(side, "small")])
                for side in ("bare", "pipeline")}
    print(f"pipeline overhead: JPEGs (<=448x320) from {origin}, amortized, CPU, {threads} "
          f"torch threads, shard size {args.shard_size}, best of {args.repeats}")
    print(f"ray.init (not timed): {ray_start:.1f} s")
    print(f"{'':34} {'bare loop':>10} {'pipeline':>10} {'ratio':>6}")
    for side in ("small", "large"):
        count = n if side == "small" else 3 * n
        b, p = best[("bare", side)], best[("pipeline", side)]
        print(f"{f'seconds for {count} images':34} {b:>10.2f} {p:>10.2f} {b / p:>6.2f}")
    print(f"{f'images/s end to end ({3 * n} images)':34} {rate['bare']:>10.2f} "
          f"{rate['pipeline']:>10.2f} {rate['pipeline'] / rate['bare']:>6.2f}")
    print(f"{'images/s marginal (steady state)':34} {marginal['bare']:>10.2f} "
          f"{marginal['pipeline']:>10.2f} {marginal['pipeline'] / marginal['bare']:>6.2f}"
          "   (target >= 0.85)")
    fixed = {side: best[(side, "small")] - n / marginal[side] for side in ("bare", "pipeline")}
    print(f"fixed cost: pipeline {fixed['pipeline']:.1f} s (actor start-up, model load, "
          f"planning, warm-up), bare loop {fixed['bare']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
