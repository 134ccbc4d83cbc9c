"""What the latent layouts cost: replicate (all of y's grid) against tight / tight+1.

    python bench/latent_layout.py ../shared/data/bsds500/val --limit 12

Per image and rate point, the amortized encoding of the default model (estimated bits: the
model's own likelihoods, within about 0.1% of a stream's payload) coded in each layout
(codec.bitstream.PAD_MODES), and in the per-image choice the encoder makes
(codec.inference.infer's default). Prints mean bpp and PSNR per layout, the bits against
replicate, the BD-rate over the rate points, how often each layout was chosen, and the
seconds of amortized inference per variant against replicate's (the choice adds the
synthesis of the border strips where the layouts differ; measured in one run). The
gain depends on how far the image's size is from a multiple of 64 (docs/bitstream.md), so
say which images a number comes from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec.bitstream import TIGHT_MARGINS
from codec.evaluation import load_images
from codec.images import padded_batch
from codec.inference import InferenceConfig, infer
from codec.metrics import bd_rate
from codec.model import DOWNSAMPLE
from codec.registry import load_point

CHOICE = "chosen"  # the encoder's per-image choice among TIGHT_MARGINS
VARIANTS = {"replicate": ("replicate",), **{t: (t,) for t in TIGHT_MARGINS},
            CHOICE: tuple(TIGHT_MARGINS)}


def measure(folders: list[str], limit: int | None, rates: list[int], model: str | None
            ) -> dict:
    """Per variant and rate: mean estimated bpp, mean PSNR; and the layouts chosen."""
    images = load_images(folders, limit)
    sums = {(v, r): [0.0, 0.0] for v in VARIANTS for r in rates}
    seconds = dict.fromkeys(VARIANTS, 0.0)
    chosen: Counter[str] = Counter()
    amortized = InferenceConfig(method="amortized")
    for n, im in enumerate(images, 1):
        h, w = im.rgb.shape[:2]
        x = torch.from_numpy(padded_batch([im.rgb], DOWNSAMPLE)).permute(0, 3, 1, 2)
        for r in rates:
            point = load_point(model, r)
            for variant, layouts in VARIANTS.items():
                t0 = time.perf_counter()
                lat = infer(point.model, x, [(h, w)], point.entry.lmbda, amortized,
                            layouts=layouts)
                seconds[variant] += time.perf_counter() - t0
                s = sums[(variant, r)]
                s[0] += float(lat.start_terms["bpp"][0])
                s[1] += -10 * math.log10(float(lat.start_terms["mse"][0]))
                if variant == CHOICE:
                    chosen[lat.layouts[0]] += 1
        print(f"\r{n}/{len(images)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    k = len(images)
    curves = {v: [(sums[(v, r)][0] / k, sums[(v, r)][1] / k) for r in rates] for v in VARIANTS}
    return {"images": k, "rates": rates, "curves": curves, "chosen": dict(chosen),
            "seconds": seconds}


def report(result: dict) -> None:
    base = result["curves"]["replicate"]
    print(f"{result['images']} images, amortized, estimated bits; per rate point "
          "bpp / PSNR (bits vs replicate, PSNR difference)")
    for variant, curve in result["curves"].items():
        cells = [f"{b:.4f} / {p:.2f} ({100 * (b / b0 - 1):+.1f}%, {p - p0:+.2f} dB)"
                 for (b, p), (b0, p0) in zip(curve, base, strict=True)]
        d = None if variant == "replicate" else bd_rate(curve, base)
        bd = "" if d is None else f"  BD-rate {d:+.2f}%"  # None: too few rate points
        print(f"{variant:>9}: " + " | ".join(cells) + bd)
    print("chosen:", ", ".join(f"{k} {v}" for k, v in sorted(result["chosen"].items())))
    t = result["seconds"]
    print("inference seconds vs replicate: " + ", ".join(
        f"{v} {t[v] / t['replicate']:.2f}x" for v in t if v != "replicate"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="image folders")
    p.add_argument("--limit", type=int, default=None, help="the first N images")
    p.add_argument("--rates", default="0,64,128,192,256", help="rate points (grid indices)")
    p.add_argument("--model", default=None, help="variable-rate model id (default: the "
                   "default model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.folders, args.limit, [int(r) for r in args.rates.split(",")],
                     args.model)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
