#!/usr/bin/env python
"""Large photos: amortized encode and decode, tiled vs whole image, seconds and peak memory.

    python bench/large_photo.py                          # 6000x4000 (24 MP), CPU
    python bench/large_photo.py --size 1500x1000 --json large.json
    python bench/large_photo.py --size 1500x1000 --min-tiled-pixels 0 --tile 32   # quick
    python bench/large_photo.py --device cuda --threads 8
    python bench/large_photo.py --size 10000x10000 --threads 1   # 100 MP: tiled only

A synthetic photo-like JPEG (quality 95) of --size is written once; then each operation
runs in its own subprocess, so that its peak resident memory (getrusage ru_maxrss, which
only grows) is that operation's alone:

    encode untiled, encode tiled   Codec.encode, amortized, of the JPEG (load not timed)
    decode untiled, decode tiled   decode() of the tiled run's stream, to 8-bit pixels

"untiled" forces codec.tiling's size threshold off and the exact hyper-synthesis into one
tile, so the whole image runs at once (the code path of every image below the threshold);
"tiled" is the default behaviour. The untiled runs are skipped above --untiled-max-pixels
(default 30 MP: a whole 100 MP image needs tens of GiB). Reported per run: seconds, peak
RSS, RSS before the operation (interpreter, torch, model, source image), the growth
(peak - before) in bytes per pixel, and per operation the ratio tiled / untiled. On CUDA
also the peak of torch.cuda.max_memory_allocated. The two modes' streams and decoded
pixels are compared (the stream must be the same; pixels equal or within one 8-bit level).
A tool, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # runnable as `python bench/large_photo.py` without install
    sys.path.insert(0, str(_ROOT))

from bench.common import cpu_model, log  # noqa: E402

GIB = 2.0**30
MODES = ("untiled", "tiled")


def synthetic_photo(width: int, height: int, seed: int = 0, band: int = 256) -> np.ndarray:
    """Deterministic photo-like RGB (sky gradient, oriented texture, two discs, noise), made
    in bands of rows so that a 24 MP image needs no full-size float arrays."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), np.uint8)
    xx = np.arange(width, dtype=np.float64)[None, :]
    u = xx / width
    for top in range(0, height, band):
        yy = np.arange(top, min(top + band, height), dtype=np.float64)[:, None]
        v = yy / height
        img = np.empty((len(yy), width, 3))
        for c in range(3):
            sky = 60 + 150 * (1 - v) * (0.6 + 0.4 * np.cos(2.0 * u + c))
            texture = 18 * np.sin(xx / (3.0 + c) + 5 * np.sin(yy / 37.0)) * np.cos(yy / 7.0 - c)
            img[..., c] = sky + texture * (v > 0.45)
        for cx, cy, r, col in [(0.3, 0.6, 0.12, (200, 60, 40)),
                               (0.7, 0.35, 0.09, (30, 90, 170))]:
            disc = (u - cx) ** 2 * (width / height) ** 2 + (v - cy) ** 2 < r**2
            img[disc] = col
        img += rng.normal(0.0, 4.0, img.shape)
        out[top:top + len(yy)] = np.clip(np.round(img), 0, 255)
    return out


def peak_rss() -> float:
    """Peak resident memory of this process so far, bytes (Linux: ru_maxrss is in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ------------------------------------------------------------------ child: one operation


def child(args: argparse.Namespace) -> None:
    """Run one operation in this process and print its measurements as one JSON line."""
    import torch

    from codec import frozen, tiling
    from codec.api import Codec, decode
    from codec.images import load_image
    from codec.inference import InferenceConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "untiled":
        tiling.MIN_TILED_PIXELS = frozen.HS_TILE = sys.maxsize
    elif args.min_tiled_pixels is not None:
        tiling.MIN_TILED_PIXELS = args.min_tiled_pixels
    if args.tile:
        tiling.SYNTHESIS_TILE, tiling.ANALYSIS_TILE = args.tile, 16 * args.tile
    device = torch.device(args.device)
    work = Path(args.workdir)
    codec = Codec(args.model, device=device)
    if args.op in ("encode", "sga"):
        image = load_image(work / "photo.jpg")
        config = (InferenceConfig(method="amortized") if args.op == "encode" else
                  InferenceConfig(iterations=args.sga_iterations))
        before = peak_rss()
        t0 = time.perf_counter()
        result = codec.encode(image, config)
        _sync(device)
        seconds = time.perf_counter() - t0
        if args.op == "encode":
            (work / f"{args.mode}.sga").write_bytes(result.data)
        extra = {"bpp": result.bpp, "psnr": result.psnr, "iterations": result.iterations}
    else:
        data = (work / "tiled.sga").read_bytes()
        before = peak_rss()
        t0 = time.perf_counter()
        decoded = decode(data, device=args.device)
        _sync(device)
        seconds = time.perf_counter() - t0
        np.save(work / f"{args.mode}.npy", decoded.rgb)
        extra = {}
    out = {"seconds": seconds, "peak_rss": peak_rss(), "rss_before": before, **extra}
    if device.type == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out), flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- parent: all of them


def run_child(op: str, mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", op, "--mode", mode,
           "--workdir", str(workdir), "--device", args.device, "--threads", str(args.threads)]
    for name in ("model", "min_tiled_pixels", "tile", "sga_iterations"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    log(f"{op} {mode} ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{op} {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    from PIL import Image

    width, height = args.size
    log(f"writing a synthetic {width}x{height} JPEG")
    Image.fromarray(synthetic_photo(width, height)).save(workdir / "photo.jpg", quality=95)
    results: dict[str, dict] = {}
    modes = MODES if width * height <= args.untiled_max_pixels else ("tiled",)
    if "untiled" not in modes:
        log(f"{width}x{height} is over --untiled-max-pixels: tiled runs only")
    for op in ("encode", "decode"):
        runs = {mode: run_child(op, mode, args, workdir) for mode in modes}
        if "untiled" in runs:
            tiled, untiled = runs["tiled"], runs["untiled"]
            runs["ratio_seconds"] = tiled["seconds"] / untiled["seconds"]
            runs["ratio_peak_rss"] = tiled["peak_rss"] / untiled["peak_rss"]
        results[op] = runs
    if args.sga_iterations:  # tiled only: untiled SGA on a 24 MP image needs tens of GiB
        results["sga"] = {"tiled": run_child("sga", "tiled", args, workdir)}
    for m in (m for runs in results.values() for m in runs.values() if isinstance(m, dict)):
        m["grown_bytes_per_pixel"] = (m["peak_rss"] - m["rss_before"]) / (width * height)
    from codec import tiling

    threshold = tiling.MIN_TILED_PIXELS if args.min_tiled_pixels is None else (
        args.min_tiled_pixels)
    tile = args.tile or tiling.SYNTHESIS_TILE
    same_stream = diff = None
    if "untiled" in modes:
        same_stream = ((workdir / "tiled.sga").read_bytes()
                       == (workdir / "untiled.sga").read_bytes())
        diff = int(np.abs(np.load(workdir / "tiled.npy").astype(np.int16)
                          - np.load(workdir / "untiled.npy")).max())
    return {"size": f"{width}x{height}", "megapixels": width * height / 1e6,
            "device": args.device, "machine": machine(args), "threads": args.threads or None,
            "model": args.model, "min_tiled_pixels": threshold, "tile": tile,
            "results": results, "same_stream": same_stream, "max_pixel_diff": diff}


def machine(args: argparse.Namespace) -> str:
    """The processor (and GPU), threads and torch version, and how busy the CPUs were."""
    import torch

    cpu = cpu_model()
    if args.device.startswith("cuda"):
        cpu += f" + {torch.cuda.get_device_name(torch.device(args.device))}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    note = f", load average {load:.1f} before the runs" if load is not None else ""
    threads = args.threads or torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} CPUs, {threads} torch threads, "
            f"torch {torch.__version__}{note}")


def format_report(r: dict) -> str:
    lines = [f"{r['size']} ({r['megapixels']:.1f} MP) synthetic JPEG, amortized, {r['machine']}",
             f"tiled mode: images over {r['min_tiled_pixels']:,} pixels, cores of "
             f"{r['tile']} latents ({16 * r['tile']} px)",
             "", "| operation | mode | seconds | peak RSS GiB | RSS before GiB | growth B/px |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for op, runs in r["results"].items():
        for mode in [m for m in MODES if m in runs]:
            m = runs[mode]
            cuda = (f" (CUDA peak {m['cuda_peak_allocated'] / GIB:.2f} GiB)"
                    if "cuda_peak_allocated" in m else "")
            name = f"SGA, {m['iterations']} it" if op == "sga" else op
            lines.append(f"| {name} | {mode} | {m['seconds']:.2f} | {m['peak_rss'] / GIB:.2f}"
                         f"{cuda} | {m['rss_before'] / GIB:.2f} | "
                         f"{m['grown_bytes_per_pixel']:.1f} |")
        if "ratio_seconds" in runs:
            lines.append(f"| {op} | tiled / untiled | {runs['ratio_seconds']:.2f}x | "
                         f"{runs['ratio_peak_rss']:.2f}x | | |")
    if r["same_stream"] is not None:
        lines += ["", f"same stream: {r['same_stream']}; decoded pixels differ by at most "
                  f"{r['max_pixel_diff']} level(s)"]
    return "\n".join(lines)


def size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 6000x4000, not {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError("width and height must be positive")
    return w, h


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=size, default=(6000, 4000), help="WxH (default 6000x4000)")
    p.add_argument("--model", default=None, help="model id (default: the default quality)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--min-tiled-pixels", type=int, default=None,
                   help="tile images above this many pixels (default: codec.tiling's; 0 "
                        "tiles a small --size too, to exercise tiling quickly)")
    p.add_argument("--tile", type=int, default=None,
                   help="core edge in latents (g_s; g_a gets 16x as many pixels); "
                        "default: codec.tiling's")
    p.add_argument("--untiled-max-pixels", type=int, default=30_000_000,
                   help="run the untiled baseline only up to this many pixels (default 30 MP)")
    p.add_argument("--workdir", default=None, help="keep the JPEG, streams and pixels here")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--sga-iterations", type=int, default=0,
                   help="also time an SGA encode (tiled, default schedule) of this many "
                        "iterations (0: skip)")
    p.add_argument("--child", choices=("encode", "decode", "sga"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(argparse.Namespace(**{**vars(args), "op": args.child}))
        return
    with tempfile.TemporaryDirectory(prefix="sgarc-large-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = measure(args, workdir)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
