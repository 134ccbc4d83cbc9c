"""SGA settings around the default at one budget: does another lr or schedule do better?

    python bench/sga_settings.py --model msh-vr5 --rates 64,128 --iterations 500 \\
        --try lr=0.02 --try lr=0.04 --try c=0.0005 --try t0=350 --try tau0=0.7

Each ``--try`` overrides fields of the default `codec.inference.InferenceConfig` (the
product's: scaled schedule, lr 1e-2) at ``--iterations``; the default itself always runs
first, in the same process, so every row is a difference against a baseline measured in the
same run. The number is the mean relative reduction of the true (hard-rounded) RD loss from
the amortized start, per rate point. It tunes, so it reads *train* crops by default
(bsds500/train): the figures reported on val come from `sgarc eval` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec.evaluation import load_images
from codec.inference import InferenceConfig, infer
from codec.registry import REGISTRY, load_point

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "train"
FIELDS = {"lr": float, "tau0": float, "c": float, "t0": int, "schedule": str}


def parse_try(text: str) -> dict:
    """``lr=0.02,c=0.0005`` as InferenceConfig overrides."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in FIELDS or not value:
            raise SystemExit(f"--try {text!r}: use NAME=VALUE with NAME one of "
                             f"{', '.join(FIELDS)}")
        out[name] = FIELDS[name](value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model id or quality (default: the default)")
    p.add_argument("--rates", default=None,
                   help="rate points of a variable-rate model, e.g. 64,128 (default: the "
                        "model's default point)")
    p.add_argument("--iterations", type=int, default=500, help="SGA budget (default 500)")
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="K=V[,K=V]",
                   help=f"settings to compare with the default ({', '.join(FIELDS)})")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (train)")
    p.add_argument("--limit", type=int, default=6, help="first N images by name (default 6)")
    p.add_argument("--crop", type=int, default=192, help="centre crop, multiple of 64")
    p.add_argument("--registry", type=Path, default=REGISTRY)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = int(args.model) if args.model and args.model.isdigit() else args.model
    images = load_images([str(args.data)], args.limit, (args.crop, args.crop))
    x = torch.stack([torch.from_numpy(im.rgb).permute(2, 0, 1) for im in images]).float() / 255
    sizes = [(args.crop, args.crop)] * len(images)
    rates = [int(r) for r in args.rates.split(",")] if args.rates else [None]
    tries = [{}, *(parse_try(t) for t in args.tries)]
    print(f"{len(images)} crops {args.crop}px from {args.data}, {args.iterations} iterations, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    print(f"{'rate':>5} {'settings':<28} {'loss -%':>8} {'vs default':>11} {'s':>6}")
    rows = []
    for rate in rates:
        point = load_point(model, rate, args.registry)  # None: the default point
        baseline = None
        for over in tries:
            cfg = InferenceConfig(iterations=args.iterations, **over)
            t0 = time.perf_counter()
            lat = infer(point.model, x, sizes, point.entry.lmbda, cfg)
            gain = 100 * float(((lat.start_loss - lat.loss) / lat.start_loss).mean())
            baseline = gain if baseline is None else baseline
            row = {"model": point.entry.id, "rate": point.rate, "settings": over,
                   "iterations": args.iterations, "loss_reduction_pct": gain,
                   "vs_default_points": gain - baseline,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            label = ",".join(f"{k}={v}" for k, v in over.items()) or "default"
            print(f"{point.rate if point.rate is not None else '-':>5} {label:<28} {gain:>8.2f} "
                  f"{gain - baseline:>+11.2f} {row['seconds']:>6.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
