"""Variable-rate checkpoints (or shipped models) side by side, on held-out train crops.

    python bench/compare_checkpoints.py msh-vr5 training/msh-vrw.ckpt runs/branch/vr.ckpt

For choosing between training runs (a loss weighting, a schedule) without looking at val:
the crops are centre 256-px crops of every 20th file of the train folders
(bench/train_study.py's held-out set). Per model, amortized estimated bpp and PSNR (hard
rounding, the model's own likelihoods: no stream is written, so a checkpoint needs no
export) at every 16th grid point; then its top PSNR, its BD-rate against the first model
named and, while the fixed-rate zoo still encodes (before it became decode-only), its
BD-rate against the zoo and its rate against each zoo level at that level's PSNR
(negative: fewer bits than the zoo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rate_points import checkpoint_model
from bench.train_study import DATA, crops, held_out
from codec.inference import InferenceConfig, infer
from codec.metrics import bd_rate, rate_saving
from codec.model import MeanScaleHyperprior
from codec.registry import entries, load
from codec.train import image_files
from codec.variable_rate import GainedMeanScaleHyperprior

RATES = list(range(0, 257, 16))


def variable_model(name: str) -> tuple[GainedMeanScaleHyperprior, str]:
    """A checkpoint file (its float weights) or a shipped variable-rate model id."""
    if name.endswith(".ckpt"):
        model, state = checkpoint_model(name)
        return model, f"{name}@{state['step']}"
    return load(name).variable, name


def point(net: MeanScaleHyperprior, x: torch.Tensor, lmbda: float) -> tuple[float, float]:
    """(mean estimated bpp, mean PSNR) of the amortized encodings of the crops x."""
    lat = infer(net, x, [tuple(x.shape[2:])] * x.shape[0], lmbda,
                InferenceConfig(method="amortized"))
    psnr = -10 * torch.log10(lat.start_terms["mse"])
    return float(lat.start_terms["bpp"].mean()), float(psnr.mean())


def vs_zoo(curve: list[tuple[float, float]], zoo: list[tuple[float, float]]) -> list:
    """The curve's rate against each zoo level at that level's PSNR, in %."""
    out = []
    for level in zoo:
        s = rate_saving(level, curve)  # the level against the curve
        out.append(None if s is None else (1 / (1 + s / 100) - 1) * 100)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="checkpoint files (*.ckpt) or shipped model ids")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, held = held_out(image_files(DATA))
    x = torch.from_numpy(np.stack(crops(held, 256))).permute(0, 3, 1, 2).float() / 255.0
    print(f"{x.shape[0]} held-out train crops of 256 px")
    levels = sorted((e for e in entries() if e.id.startswith("msh-small-q")),
                    key=lambda e: e.quality)
    zoo = ([point(load(e.id).model, x, 0.0) for e in levels]
           if levels and not any(e.decode_only for e in levels) else [])
    curves = {}
    for name in args.models:
        model, label = variable_model(name)
        tables = model.gain_tables()
        curve = [point(model.materialize(tables, r), x, model.rate_lmbda(r)) for r in RATES]
        curves[label] = curve
        first = next(iter(curves))
        line = (f"{label}: top {curve[-1][1]:.2f} dB, BD-rate vs {first} "
                f"{bd_rate(curve, curves[first]):+.2f}%")
        if zoo:
            per_level = " ".join("n/a" if s is None else f"{s:+.1f}" for s in vs_zoo(curve, zoo))
            line += f", vs the zoo {bd_rate(curve, zoo):+.2f}% (q1..q6: {per_level} %)"
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rates": RATES, "zoo": zoo, "curves": curves},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
