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

`measure(...)` does the same from Python and returns the numbers as a dict; the suite
`python -m bench` reports its marginal ratio.
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

from bench.common import log  # noqa: E402

VAL_DIR = ROOT.parent / "shared" / "data" / "bsds500" / "val"
TARGET_RATIO = 0.85  # pipeline's marginal throughput over the bare loop's (performance issue)


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


def pipeline(folder: Path, out: Path, quality: int | None, shard_size: int) -> float:
    """Seconds for `sgarc run` on the same folder (Ray already up)."""
    from pipeline.run import RunOptions, run
    from pipeline.settings import EncodeSettings

    t0 = time.perf_counter()
    summary = run(str(folder), str(out), EncodeSettings(quality=quality, method="amortized"),
                  RunOptions(shard_size=shard_size, device="cpu", progress=False))
    assert summary.errors == 0 and summary.skipped == 0
    return time.perf_counter() - t0


def measure(images: int = 48, repeats: int = 2, shard_size: int = 8,
            quality: int | None = None, source: Path | None = VAL_DIR) -> dict:
    """Both sides on `images` and 3x `images` JPEGs, best of `repeats`; the numbers as a dict.

    Starts Ray (untimed) unless it is already running, and then shuts it down again.
    """
    import ray

    from pipeline.actors import layout

    saved_threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="sgarc-bench-"))
    started = not ray.is_initialized()
    try:
        n = images
        origin = make_inputs(work / "small", n, source)
        make_inputs(work / "large", 3 * n, source)
        t0 = time.perf_counter()
        if started:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - t0
        threads = layout(ray.cluster_resources()).torch_threads
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(repeats):
            for size in ("small", "large"):
                log(f"pipeline overhead: {size} ({n if size == 'small' else 3 * n} images), "
                    f"round {r + 1} of {repeats} ...")
                times.setdefault(("bare", size), []).append(
                    bare_loop(work / size, work / f"bare-{size}{r}", quality, threads))
                times.setdefault(("pipeline", size), []).append(
                    pipeline(work / size, work / f"out-{size}{r}", quality, shard_size))
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        torch.set_num_threads(saved_threads)
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    sides = ("bare", "pipeline")
    rate = {side: 3 * n / best[(side, "large")] for side in sides}
    marginal = {side: 2 * n / (best[(side, "large")] - best[(side, "small")]) for side in sides}
    fixed = {side: best[(side, "small")] - n / marginal[side] for side in sides}
    return {
        "images": n, "repeats": repeats, "shard_size": shard_size, "origin": origin,
        "threads": threads, "ray_start_s": ray_start if started else None,
        "seconds": {f"{side}_{size}": times[(side, size)] for side in sides
                    for size in ("small", "large")},
        "images_per_s": rate, "marginal_images_per_s": marginal, "fixed_cost_s": fixed,
        "end_to_end_ratio": rate["pipeline"] / rate["bare"],
        "marginal_ratio": marginal["pipeline"] / marginal["bare"],
        "target_marginal_ratio": TARGET_RATIO,
    }


def format_report(m: dict) -> str:
    """The table `main` prints, from `measure`'s dict."""
    n = m["images"]
    best = {k: min(v) for k, v in m["seconds"].items()}
    rate, marginal = m["images_per_s"], m["marginal_images_per_s"]
    ray_start = "already running" if m["ray_start_s"] is None else f"{m['ray_start_s']:.1f} s"
    lines = [f"pipeline overhead: JPEGs (<=448x320) from {m['origin']}, amortized, CPU, "
             f"{m['threads']} torch threads, shard size {m['shard_size']}, best of "
             f"{m['repeats']}",
             f"ray.init (not timed): {ray_start}",
             f"{'':34} {'bare loop':>10} {'pipeline':>10} {'ratio':>6}"]
    for size in ("small", "large"):
        count = n if size == "small" else 3 * n
        b, p = best[f"bare_{size}"], best[f"pipeline_{size}"]
        lines.append(f"{f'seconds for {count} images':34} {b:>10.2f} {p:>10.2f} {b / p:>6.2f}")
    lines.append(f"{f'images/s end to end ({3 * n} images)':34} {rate['bare']:>10.2f} "
                 f"{rate['pipeline']:>10.2f} {m['end_to_end_ratio']:>6.2f}")
    lines.append(f"{'images/s marginal (steady state)':34} {marginal['bare']:>10.2f} "
                 f"{marginal['pipeline']:>10.2f} {m['marginal_ratio']:>6.2f}"
                 f"   (target >= {TARGET_RATIO})")
    fixed = m["fixed_cost_s"]
    lines.append(f"fixed cost: pipeline {fixed['pipeline']:.1f} s (actor start-up, model load, "
                 f"planning, warm-up), bare loop {fixed['bare']:.1f} s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--quality", type=int, default=None)
    ap.add_argument("--source", type=Path, default=VAL_DIR)
    args = ap.parse_args()
    m = measure(args.images, args.repeats, args.shard_size, args.quality, args.source)
    print(format_report(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
