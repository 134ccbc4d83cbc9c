"""Pipeline throughput against a bare loop over the same images, in one run.

Both sides use the same codec settings (amortized inference, CPU, the same torch thread
count) on the same images: the bare loop reads each file, prepares it, encodes it and
writes the bitstream; the pipeline does the same through planning, Ray actors, storage
and Parquet. Ray is started before timing (a cluster is long-lived); actor start-up and
model loading are inside the pipeline's time. Prints images/s of both and their ratio
(target >= 0.85).

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
    return len(files) / (time.perf_counter() - t0)


def pipeline(folder: Path, out: Path, model, shard_size: int) -> float:
    from pipeline.run import RunOptions, run
    from pipeline.settings import EncodeSettings

    t0 = time.perf_counter()
    summary = run(str(folder), str(out), EncodeSettings(model=model, method="amortized"),
                  RunOptions(shard_size=shard_size, device="cpu", progress=False))
    assert summary.errors == 0 and summary.skipped == 0
    return summary.images / (time.perf_counter() - t0)


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
        origin = make_inputs(work / "in", args.images, args.source)
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - t0
        threads = layout(ray.cluster_resources()).torch_threads
        bare, piped = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(work / "in", work / f"bare{r}", args.quality, threads))
            piped.append(pipeline(work / "in", work / f"out{r}", args.quality, args.shard_size))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"pipeline overhead: {args.images} JPEGs (<=448x320) from {origin}, amortized, CPU, "
          f"{threads} torch threads, shard size {args.shard_size}")
    print(f"ray.init (not timed below): {ray_start:.1f} s")
    print(f"{'run':>4} {'bare images/s':>14} {'pipeline images/s':>18} {'ratio':>6}")
    for r, (b, p) in enumerate(zip(bare, piped, strict=True)):
        print(f"{r:>4} {b:>14.2f} {p:>18.2f} {p / b:>6.2f}")
    print(f"best {max(bare):>14.2f} {max(piped):>18.2f} {max(piped) / max(bare):>6.2f}"
          "   (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
