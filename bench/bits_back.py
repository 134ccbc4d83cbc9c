#!/usr/bin/env python
"""Lossy bits-back (SGA+BB) against SGA and amortized inference, on val images.

    python bench/bits_back.py                                  # 4 bsds500/val photos
    python bench/bits_back.py --images 8 --iterations 500 --json bb.json

Per image and method: file bpp, side-information bits carried, net bpp (file bits minus
side-information bits, per pixel), PSNR and the RD loss at the model's λ (net bpp +
λ·255²·MSE), plus the mean ratio of each method's RD loss to amortized inference's on the
same image. The bits-back methods carry random side information larger than what z_hat's
choice can hold, so their net rate is what a user with enough side information gets
(less would be stored as random filler, which costs the file). The baselines are the
fixed-rate model the bits-back model was fine-tuned from (same g_a and g_s): amortized and
SGA with the same iteration budget. A tool, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log
from codec import bits_back
from codec.api import Codec
from codec.images import load_image
from codec.inference import InferenceConfig
from codec.metrics import psnr_from_mse

VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "val"


def _mse(psnr: float) -> float:
    return 10 ** (-psnr / 10)


def _centre_crop(path: Path, size: int) -> bytes:
    from PIL import Image
    with Image.open(path) as im:
        w, h = im.size
        left, top = max(0, (w - size) // 2), max(0, (h - size) // 2)
        buf = io.BytesIO()
        im.convert("RGB").crop((left, top, left + min(size, w), top + min(size, h))).save(
            buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--bbvi-steps", type=int, default=bits_back.DEFAULT_BBVI_STEPS)
    ap.add_argument("--model", default=None, help="bits-back model id (default: the shipped one)")
    ap.add_argument("--base", default="msh-small-q4",
                    help="the fixed-rate model the bits-back model was fine-tuned from")
    ap.add_argument("--data", type=Path, default=VAL)
    ap.add_argument("--crop", type=int, default=0, metavar="PX",
                    help="centre crops of PX x PX (0: whole images)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bb_id = args.model or bits_back.default_model_id()
    bm = bits_back.load(bb_id)
    base = Codec(args.base, device="cpu")
    lmbda = bm.entry.lmbda
    cfg = InferenceConfig(iterations=args.iterations)
    files = sorted(args.data.glob("*.jpg"))[:args.images]
    rows = []
    for f in files:
        image = load_image(_centre_crop(f, args.crop) if args.crop else f)
        pixels = image.info.width * image.info.height
        xi = os.urandom(max(1024, pixels // 64))  # more than z_hat's choice can hold
        for name in ("amortized", "sga"):
            t0 = time.perf_counter()
            r = base.encode(image, InferenceConfig(method=name, iterations=args.iterations))
            rows.append({"image": f.name, "method": f"{name} ({base.model_id})", "bpp": r.bpp,
                         "side_bits": 0, "net_bpp": r.bpp, "psnr": r.psnr,
                         "seconds": time.perf_counter() - t0})
        for method in bits_back.METHODS:
            r = bits_back.encode(image, xi, bb_id, method, cfg, bbvi_steps=args.bbvi_steps)
            rows.append({"image": f.name, "method": f"{method} ({bb_id})", "bpp": r.bpp,
                         "side_bits": r.side_info_bits, "net_bpp": r.net_bpp, "psnr": r.psnr,
                         "seconds": r.seconds, "got_back": r.bits_back})
        for row in rows[-5:]:
            row["rd"] = row["net_bpp"] + lmbda * 255**2 * _mse(row["psnr"])
            log(f"{f.name} {row['method']}: net {row['net_bpp']:.4f} bpp, "
                f"{row['psnr']:.2f} dB, {row['seconds']:.0f} s")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    crop = f", centre {args.crop}px crops" if args.crop else ""
    print(f"{len(files)} images of {args.data}{crop}, λ {lmbda:.4g}, {args.iterations} iterations, "
          f"BBVI {args.bbvi_steps} steps, one CPU thread\n")
    print("| method | file bpp | net bpp | PSNR dB | RD loss / amortized | s / image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    amort = {r["image"]: r["rd"] for r in rows if r["method"].startswith("amortized")}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        ratio = np.mean([r["rd"] / amort[r["image"]] for r in mine])
        mean = {k: float(np.mean([r[k] for r in mine])) for k in ("bpp", "net_bpp", "seconds")}
        mse = float(np.mean([_mse(r["psnr"]) for r in mine]))
        print(f"| {m} | {mean['bpp']:.4f} | {mean['net_bpp']:.4f} | {psnr_from_mse(mse):.2f} "
              f"| {ratio:.4f} | {mean['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
