"""Amortized bpp and PSNR of a variable-rate model at grid points between its trained ones.

    python bench/rate_points.py training/msh-vrw.ckpt            # a training checkpoint
    python bench/rate_points.py msh-vr5 --step 4 --images 6      # a shipped model

Run it before exporting: a model trained at its λ points only can code badly between them
(msh-vr3, docs/codec.md "Rate points between the trained ones"), and a target search or a
quality level lands there. A checkpoint is exported to a temporary registry first, so the
numbers are those of real streams (file bits, decoded 8-bit pixels), on centre crops of
val images (report only). Points where the rate falls or the PSNR drops by more than 0.1 dB
against the previous point are marked.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec.api import Codec
from codec.evaluation import load_images, measure_sgarc
from codec.inference import InferenceConfig
from codec.registry import REGISTRY, export_model
from codec.variable_rate import GainedMeanScaleHyperprior

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "val"


def checkpoint_model(checkpoint: Path | str) -> tuple[GainedMeanScaleHyperprior, dict]:
    """The variable-rate model of a training checkpoint (float, eval mode) and the state."""
    state = torch.load(checkpoint, weights_only=True)
    cfg = state["config"]
    model = GainedMeanScaleHyperprior(cfg["N"], cfg["M"], tuple(cfg["lmbdas"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def checkpoint_registry(checkpoint: Path, folder: Path, beside: Path | None = None) -> Path:
    """A registry in `folder` holding the checkpoint's model as id "checkpoint", exported as
    an export would ship it (fp16, steps counted from the start), so it is measured as it
    would code. ``beside``: a registry whose models it holds too (their files linked), for
    ``sgarc eval --registry`` against the shipped ones in one run."""
    model, state = checkpoint_model(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    registry = folder / "registry.json"
    if beside is not None:
        for f in beside.parent.iterdir():
            if f.name != beside.name and not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
        shutil.copy(beside, registry)
    export_model(model, "checkpoint", quality=0, lmbda=0.0,
                 steps=state["step"] + state.get("init_steps", 0), data=str(checkpoint),
                 registry=registry, half=True)
    return registry


def measure(codec: Codec, images, rates: list[int]) -> list[tuple[int, float, float]]:
    """(rate, mean bpp, mean PSNR) per rate point, amortized (sgarc eval's measure)."""
    amortized = InferenceConfig(method="amortized")
    points = [measure_sgarc(codec.at_rate(r), images, amortized)[0] for r in rates]
    return [(r, p["bpp"], p["psnr"]) for r, p in zip(rates, points, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a training checkpoint (.ckpt) or a registry model id")
    p.add_argument("--registry", type=Path, default=REGISTRY, help="for a model id")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (a val folder)")
    p.add_argument("--images", type=int, default=4, help="first N images (default 4)")
    p.add_argument("--crop", type=int, default=192, help="centre crop side (default 192)")
    p.add_argument("--step", type=int, default=8, help="grid points apart (default 8)")
    p.add_argument("--keep-registry", type=Path, default=None, metavar="DIR",
                   help="for a checkpoint: keep its registry in DIR, beside --registry's "
                        "models, for `sgarc eval --registry DIR/registry.json --model "
                        "checkpoint --model msh-vr3 ...`")
    args = p.parse_args(argv)
    images = load_images([args.data], args.images, (args.crop, args.crop))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.endswith(".ckpt"):
            folder = args.keep_registry or Path(tmp)
            registry = checkpoint_registry(Path(args.model), folder, args.registry)
            model_id = "checkpoint"
        else:
            registry, model_id = args.registry, args.model
        codec = Codec(model_id, device="cpu", registry=registry)
        if codec.lm.variable is None:
            p.error(f"{model_id} is a fixed-rate model")
        step = max(args.step, codec.lm.entry.rate_step)
        rates = list(range(0, codec.lm.variable.max_rate_index + 1, step))
        rows = measure(codec, images, rates)
    print(f"{args.model} ({codec.lm.entry.steps:,} steps): {len(images)} crops of "
          f"{args.crop}px, amortized")
    print(f"{'rate':>5} {'bpp':>7} {'PSNR':>6}")
    previous = None
    for r, bpp, db in rows:
        bad = previous is not None and (bpp <= previous[0] or db < previous[1] - 0.1)
        print(f"{r:>5} {bpp:7.3f} {db:6.2f}{'  <- not monotone' if bad else ''}")
        previous = (bpp, db)
    return 0


if __name__ == "__main__":
    sys.exit(main())
