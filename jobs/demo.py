"""The README's demo: encode and decode a few real photos on embedded defaults.

The photos are scikit-image's bundled sample images (no download). Each is encoded with the
amortized encoder and with SGA, written as .sga, decoded back to PNG and summarized. Then
the same photos, as a folder, go through the recompression pipeline (local Ray, local
directories, Parquet metrics) the way an archive would.
"""

from __future__ import annotations

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
            cfg = InferenceConfig(method=method, iterations=n)
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
    archive = _pipeline_demo(out, photos, quality)
    print(f"\nnext: sgarc info {out}/astronaut-sga.sga; "
          f"sgarc decode {out}/coffee-sga.sga coffee.png; "
          f"sgarc run {out}/photos {archive} -m amortized  (a rerun skips what is done)")
    return 0


def _pipeline_demo(out: Path, photos: dict[str, bytes], quality: int | None) -> Path:
    """`sgarc run` on the photos as a folder: amortized, local Ray, Parquet metrics."""
    import pyarrow.dataset as ds

    from codec.files import atomic_write
    from pipeline.run import RunOptions, run
    from pipeline.settings import EncodeSettings

    folder, archive = out / "photos", out / "archive"
    for name, png in photos.items():
        path = folder / f"{name}.png"
        if not path.exists() or path.read_bytes() != png:  # keep mtimes: reruns skip
            atomic_write(path, png)
    print(f"\npipeline: sgarc run {folder} {archive} -m amortized")
    summary = run(str(folder), str(archive), EncodeSettings(model=quality, method="amortized"),
                  RunOptions(shard_size=2))
    print(summary.line())
    table = ds.dataset(archive / "metrics", format="parquet", partitioning="hive").to_table(
        columns=["source_key", "source_bytes", "bitstream_bytes", "bpp", "psnr", "status"],
        filter=ds.field("run_id") == summary.run_id)
    if not table.num_rows:
        print("  nothing new: every photo was done by an earlier run with these settings")
    for row in sorted(table.to_pylist(), key=lambda r: r["source_key"]):
        print(f"  {row['source_key']:<14} {row['status']:<5} {row['source_bytes']:>8} B -> "
              f"{row['bitstream_bytes'] or 0:>6} B  {row['bpp'] or 0:.4f} bpp  "
              f"{row['psnr'] or 0:.2f} dB")
    return archive
