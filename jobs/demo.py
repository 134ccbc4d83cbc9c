"""The README's demo: encode and decode a few real photos on embedded defaults.

The photos are scikit-image's bundled sample images (no download). Each is encoded with the
amortized encoder and with SGA, written as .sga, decoded back to PNG and summarized. Then
the same photos, as a folder, go through a job spec the way an archive would: the pipeline
(local Ray, local directories, Parquet metrics) encodes them with the amortized encoder,
a refinement pass re-encodes them with SGA, and the metrics summary is printed.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = ("astronaut", "coffee", "chelsea")


def sample_photos() -> dict[str, bytes]:
    """PNG bytes of scikit-image's sample photos."""
    from skimage import data

    out = {}
    for name in SAMPLES:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(getattr(data, name)())).save(buf, "PNG")
        out[name] = buf.getvalue()
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sgarc demo``."""
    p = subparsers.add_parser("demo", help="encode and decode a few sample photos (the "
                              "README's demo)")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--iterations", "-n", type=int, default=100,
                   help="SGA iterations per image (default: 100, to finish in minutes on CPU)")
    p.add_argument("--quality", "-q", type=int, default=None)
    p.set_defaults(func=lambda args: run_demo(Path(args.out), args.iterations, args.quality))


def run_demo(out: Path, iterations: int = 100, quality: int | None = None) -> int:
    from tqdm import tqdm

    from codec.api import Codec, decode
    from codec.files import atomic_write
    from codec.images import load_image
    from codec.inference import InferenceConfig

    out.mkdir(parents=True, exist_ok=True)
    codec = Codec(quality)
    print(f"model {codec.model_id} on {codec.device}; writing to {out}/")
    rows = []
    photos = sample_photos()
    for name, png in photos.items():
        image = load_image(png)
        for method, n in (("amortized", 0), ("sga", iterations)):
            cfg = InferenceConfig(method=method, iterations=n)  # the product's settings
            with tqdm(total=n, desc=f"{method} {name}", leave=False, disable=n == 0) as bar:
                result = codec.encode(image, cfg, progress=bar.update)
            stream = out / f"{name}-{method}.sga"
            atomic_write(stream, result.data)
            t0 = time.perf_counter()
            decoded = decode(stream.read_bytes())
            decode_s = time.perf_counter() - t0
            decoded.save(out / f"{name}-{method}.png")
            print(f"{stream.name}: {result.summary()}; decoded in {decode_s:.2f} s")
            rows.append((name, method, result))
    print(f"\n{'image':<10} {'method':<10} {'PNG bytes':>9} {'.sga bytes':>10} {'bpp':>7} "
          f"{'PSNR dB':>7} {'seconds':>7}")
    for name, method, r in rows:
        print(f"{name:<10} {method:<10} {len(photos[name]):>9} {len(r.data):>10} {r.bpp:>7.4f} "
              f"{r.psnr:>7.2f} {r.seconds:>7.2f}")
    archive = _job_demo(out, photos, quality, max(1, iterations // 2))
    print(f"""
next (after `. .venv/bin/activate`):
  sgarc info {out}/astronaut-sga.sga
  sgarc decode {archive}/bitstreams/coffee.png.sga -o coffee.png
  sgarc serve --archive {archive}      # then GET http://127.0.0.1:8080/images/coffee.png
  sgarc report {archive} -o report.html
  sgarc submit {out}/job.toml           # again: nothing new, so nothing is redone""")
    return 0


def _job_demo(out: Path, photos: dict[str, bytes], quality: int | None,
              refine_iterations: int) -> Path:
    """A job spec over the photos as a folder: amortized coverage, then SGA refinement."""
    from codec.files import atomic_write
    from jobs.cli import main

    folder, archive = out / "photos", out / "archive"
    for name, png in photos.items():
        path = folder / f"{name}.png"
        if not path.exists() or path.read_bytes() != png:  # keep mtimes: reruns skip
            atomic_write(path, png)
    quality_line = f"quality = {quality}\n" if quality is not None else ""
    spec = out / "job.toml"
    atomic_write(spec, f"""# sgarc demo: coverage with the amortized encoder, then SGA refinement
[job]
name = "demo"
input = "photos"
output = "archive"

[encode]
{quality_line}method = "amortized"

[run]
shard_size = 2

[refine]
enabled = true
method = "sga"
iterations = {refine_iterations}
""".encode())
    print(f"\njob: sgarc submit {spec}")
    main(["submit", str(spec)])
    print(f"\nmetrics: sgarc metrics {archive}")
    main(["metrics", str(archive), "--worst", "3"])
    return archive
