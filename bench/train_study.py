"""Which training settings give the best rate-distortion after a fixed compute budget?

    python bench/train_study.py --init training/msh-vr.ckpt --budget 150 --json study.json

Every variant trains the variable-rate model for the same budget of CPU seconds (one
thread each, run one after the other; CPU time, so other load on the machine does not
change the budget) from the same start, then is scored on held-out
images: every 20th file of the train folders, which the variants do not train on (the val
folders stay for reporting). The score is the true RD loss (hard rounding, amortized
inference) per trained rate point on centre crops, relative to the first variant's: below
1 is better. Variants that change the architecture start from random weights; the others
from --init. docs/results.md reports a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log, machine_info
from codec.inference import InferenceConfig, infer
from codec.train import TrainConfig, image_files, load_training_images, train
from codec.variable_rate import DEFAULT_LMBDAS, RATE_STEPS, GainedMeanScaleHyperprior

DATA = ["../shared/data/bsds500/train", "../shared/data/wikipedia-photos/train"]
# name -> TrainConfig changes; "scratch" variants start from random weights
VARIANTS: dict[str, dict] = {
    "base (crop 128, batch 8, lr 2e-4)": {},
    "bf16": {"bf16": True},
    "crop 256, batch 2": {"crop": 256, "batch_size": 2},
    "lr 5e-4": {"lr": 5e-4},
    "wider N=96 M=144 (scratch)": {"N": 96, "M": 144, "scratch": True},
}


def held_out(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held out): every 20th file is held out."""
    return ([f for i, f in enumerate(files) if i % 20 != 19],
            [f for i, f in enumerate(files) if i % 20 == 19])


def score(model: GainedMeanScaleHyperprior, images: list[np.ndarray]) -> list[float]:
    """Mean true RD loss over the images at each trained rate point (amortized)."""
    model = model.cpu().eval()
    tables = model.gain_tables()
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    sizes = [(im.shape[0], im.shape[1]) for im in images]
    out = []
    for r in range(model.num_rates):
        net = model.materialize(tables, r * RATE_STEPS)
        lat = infer(net, x, sizes, model.lmbdas[r], InferenceConfig(method="amortized"))
        out.append(float(lat.loss.mean()))
    return out


def crops(files: list[Path], size: int) -> list[np.ndarray]:
    """Centre crops of the images at least `size` pixels on each side."""
    out = []
    for a in load_training_images(files, size):
        r, c = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        out.append(np.ascontiguousarray(a[r:r + size, c:c + size]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="checkpoint the warm variants start from")
    p.add_argument("--budget", type=float, default=150.0, help="CPU seconds of training each")
    p.add_argument("--data", action="append", default=None)
    p.add_argument("--crop", type=int, default=256, help="held-out crop size for scoring")
    p.add_argument("--only", default=None, help="comma-separated variant indices")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train_files, held = held_out(image_files(args.data or DATA))
    images = crops(held, args.crop)
    log(f"{len(train_files)} training files, {len(images)} held-out crops of {args.crop}px, "
        f"{args.budget:g} s per variant")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        folder.mkdir()
        for i, f in enumerate(train_files):  # the training subset, as a folder of links
            (folder / f"{i:05d}{f.suffix}").symlink_to(f.resolve())
        base = TrainConfig(data=[str(folder)], N=64, M=96, lmbdas=DEFAULT_LMBDAS, crop=128,
                           batch_size=8, lr=2e-4, steps=10**9, lr_drop_at=1.0, log_every=50,
                           checkpoint_every=10**9, time_budget=args.budget,
                           budget_clock="cpu")
        chosen = list(VARIANTS.items())
        if args.only:
            chosen = [chosen[int(i)] for i in args.only.split(",")]
        results = []
        for name, change in chosen:
            change = dict(change)
            scratch = change.pop("scratch", False)
            cfg = replace(base, init_from=None if scratch else args.init, **change)
            t0 = time.time()
            records: list[dict] = []
            model = train(cfg, Path(tmp) / f"{len(results)}.ckpt", log=lambda _: None,
                          on_record=records.append)
            steps = records[-1]["step"] if records else 0
            losses = score(model, images)
            results.append({"variant": name, "changes": change, "scratch": scratch,
                            "steps": steps, "seconds": time.time() - t0, "rd_loss": losses})
            log(f"{name}: {steps} steps, RD loss per rate point "
                f"{', '.join(f'{v:.3f}' for v in losses)}")
    ref = results[0]["rd_loss"]
    print(f"\n{'variant':<34}{'steps':>7}{'RD loss vs first':>18}")
    for r in results:
        rel = float(np.mean([a / b for a, b in zip(r["rd_loss"], ref, strict=True)]))
        r["relative_loss"] = rel
        print(f"{r['variant']:<34}{r['steps']:>7}{rel:>17.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"budget_seconds": args.budget, "held_out": len(images),
                                         "crop": args.crop, "machine": machine_info(),
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
