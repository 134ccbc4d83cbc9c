"""`sgarc eval`: rate-distortion of sgarc against classical codecs, measured in one run.

    sgarc eval ../shared/data/bsds500/val --json rd.json --plot rd.png
    sgarc eval ../shared/data/bsds500/val --limit 8 --sga-iterations 100,500 --json sga.json

Every image (sorted by path; ``--limit``, ``--crop WxH`` centre crops) is encoded and
decoded back for every curve: the sgarc curves one point per model (amortized, and SGA
at each ``--sga-iterations``), the classical ones a sweep. The measuring is
:mod:`codec.evaluation`; this is the command, its table, JSON report and plot.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codec.errors import SgarcError
from codec.evaluation import (
    BASELINES,
    available_baselines,
    baseline_settings,
    compare,
    load_images,
    machine,
    measure_baseline,
    measure_sgarc,
)

_CLASSICAL_COLORS = {"jpeg-420": "#8c564b", "jpeg-444": "#c49c94", "webp": "#7f7f7f",
                     "jpeg2000": "#e377c2", "avif": "#000000", "jpegxl": "#aec7e8"}


def parse_crop(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SgarcError(f"--crop must look like 256x256, not {text!r}") from None
    if w < 1 or h < 1:
        raise SgarcError(f"--crop must be positive, not {text!r}")
    return w, h



# ---------------------------------------------------------------------------- report


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=100)
    markers, strong = iter("osD^v<>phX*"), iter(("#d62728", "#1f77b4", "#2ca02c", "#9467bd",
                                                 "#ff7f0e", "#17becf", "#bcbd22"))
    for name, curve in curves.items():
        xs = [p["bpp"] for p in curve["points"]]
        ys = [p["psnr"] for p in curve["points"]]
        if curve["kind"] == "classical":  # the same colour for a codec in every plot
            ax.plot(xs, ys, marker=".", linewidth=1.2, label=curve["label"],
                    color=_CLASSICAL_COLORS.get(name))
        else:
            ax.plot(xs, ys, marker=next(markers), markersize=9, linewidth=2, linestyle="-",
                    color=next(strong, None), markeredgecolor="black", label=curve["label"])
    sg = [p["bpp"] for c in curves.values() if c["kind"] == "sgarc" for p in c["points"]]
    xmax = max(2.0, 2.0 * max(sg)) if sg else 3.0  # up to about twice sgarc's rate
    ys = [p["psnr"] for c in curves.values() for p in c["points"] if p["bpp"] <= xmax]
    ax.set_xlim(0, xmax)
    if ys:
        ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_xlabel("bits per pixel (file size)")
    ax.set_ylabel("PSNR (dB, RGB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from PIL import Image

    from codec.files import atomic_write
    with Image.open(buf) as im:  # a 256-colour palette keeps the file small (~30 KB)
        small = io.BytesIO()
        im.convert("RGB").quantize(256, Image.Quantize.FASTOCTREE).save(small, "PNG",
                                                                        optimize=True)
    atomic_write(path, small.getvalue())


def _table(curves: dict[str, dict], cmp: dict) -> list[str]:
    lines = [f"{'curve':<18} {'setting':>9} {'bpp':>8} {'PSNR':>7} {'s/img':>7}"]
    for name, curve in curves.items():
        for p in curve["points"]:
            lines.append(f"{name:<18} {p['setting']!s:>9} {p['bpp']:8.4f} {p['psnr']:7.2f} "
                         f"{p['seconds']:7.2f}")
    ref = cmp["reference"]
    lines.append(f"BD-rate vs {ref} ({cmp['bd_method']}): " + ", ".join(
        f"{n} {'n/a' if v is None else f'{v:+.1f}%'}" for n, v in cmp["bd_rate"].items()))
    for name, per in cmp["rate_saving"].items():
        lines.append(f"rate at equal PSNR, {name}: " + ", ".join(
            f"vs {c} " + "/".join("n/a" if v is None else f"{v:+.1f}%" for v in vals)
            for c, vals in per.items()))
    for name, g in cmp["sga_gain"].items():
        for p in g["points"]:
            lines.append(f"{name} over amortized (q{p['quality']}): bpp "
                         f"{p['bpp_change_pct']:+.1f}%, PSNR {p['psnr_change_db']:+.2f} dB, "
                         f"RD loss {p['rd_loss_change_pct']:+.1f}%")
    return lines


# ---------------------------------------------------------------------------- command


def _int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SgarcError(f"{what} must be a comma-separated list of integers, not "
                         f"{text!r}") from None
    if any(v < minimum for v in values):
        raise SgarcError(f"{what} must be {'positive' if minimum == 1 else f'at least {minimum}'}")
    return values


def evaluate(args) -> dict:
    from dataclasses import replace

    from tqdm import tqdm

    from codec.api import Codec
    from codec.inference import PAPER, InferenceConfig
    from codec.registry import REGISTRY, entries
    from codec.variable_rate import RATE_STEPS

    registry = Path(args.registry) if args.registry else REGISTRY
    known = entries(registry)
    fixed = [e for e in known if not e.variable_rate and e.bits_back is None]
    qualities = (_int_list(args.quality, "--quality") if args.quality
                 else sorted(e.quality for e in fixed)) if not args.model or args.zoo else []
    # (curve prefix, label prefix, codec factory) per sgarc point: the fixed-rate zoo's
    # levels, then each --model at its rate points (variable-rate) or as it is.
    sgarc_points: list[tuple[str, str, Callable[[], Any]]] = [
        ("sgarc", "sgarc", lambda q=q: Codec(q, device=args.device, registry=registry))
        for q in qualities]
    for model_id in args.model or []:
        base = Codec(model_id, device=args.device, registry=registry)
        if base.lm.variable is None:
            sgarc_points.append((f"sgarc-{model_id}", model_id, lambda c=base: c))
            continue
        var = base.lm.variable
        rates = (_int_list(args.rates, "--rates", minimum=0) if args.rates
                 else [r * RATE_STEPS for r in range(var.num_rates)])
        sgarc_points += [(f"sgarc-{model_id}", model_id, lambda c=base, r=r: c.at_rate(r))
                         for r in rates]
    iterations = _int_list(args.sga_iterations, "--sga-iterations") if args.sga_iterations \
        else []
    baselines = ([] if args.baselines == "none" else list(BASELINES) if args.baselines == "all"
                 else [b.strip() for b in args.baselines.split(",") if b.strip()])
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise SgarcError(f"unknown baseline(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(BASELINES)}, all or none")
    missing = available_baselines()
    for b in [b for b in baselines if b in missing]:
        print(f"sgarc eval: skipping {b}: {missing[b]}", file=sys.stderr)
        baselines.remove(b)
    methods = ([] if args.no_amortized else [("amortized", 0)]) + [("sga", n) for n in
                                                                   iterations]
    # The paper's schedule does not depend on the budget: one run per image to the largest,
    # coded at each. The scaled one (the product's) is stretched onto each budget: a run each.
    if args.sga_schedule == "paper":
        sga = [replace(PAPER, iterations=max(iterations), snapshots=tuple(iterations),
                       seed=args.seed)] if iterations else []
    else:
        sga = [InferenceConfig(iterations=n, seed=args.seed) for n in iterations]
    iterative_steps = sum(cfg.iterations for cfg in sga)
    images = load_images(args.dirs, args.limit, parse_crop(args.crop))
    pixels = sum(im.rgb.shape[0] * im.rgb.shape[1] for im in images)

    work = len(images) * (sum(len(BASELINES[b][2]) for b in baselines)
                          + len(sgarc_points) * ((not args.no_amortized) + iterative_steps))
    bar = tqdm(total=work, desc="eval", unit="step", dynamic_ncols=True, disable=args.quiet,
               file=sys.stderr, mininterval=2.0)
    curves: dict[str, dict] = {}
    device = None
    t0 = time.time()
    try:
        for prefix, label_prefix, make in sgarc_points:
            codec = make()
            runs = ([] if args.no_amortized else [InferenceConfig(method="amortized")]) + sga
            for cfg in runs:
                bar.set_description(f"{prefix}-{cfg.method} "
                                    f"{codec.lm.entry.quality or f'r{codec.rate}'}")
                for n, point in measure_sgarc(codec, images, cfg, bar).items():
                    name = f"{prefix}-amortized" if not n else f"{prefix}-sga-{n}"
                    label = f"{label_prefix} amortized" if not n else \
                        f"{label_prefix} SGA {n} it"
                    curve = curves.setdefault(name, {"kind": "sgarc", "label": label,
                                                     "method": cfg.method if n else "amortized",
                                                     "iterations": n, "parameter": "quality",
                                                     "points": []})
                    curve["points"].append(point)
                device = str(codec.device)
        for b in baselines:
            bar.set_description(b)
            curves[b] = measure_baseline(b, images, bar=bar)
    finally:
        bar.close()
    reference = args.reference
    if reference not in curves:
        print(f"sgarc eval: reference {reference!r} was not measured; no BD-rates",
              file=sys.stderr)
    cmp = compare(curves, reference)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "dirs": [str(d) for d in args.dirs], "limit": args.limit, "crop": args.crop,
            "qualities": qualities, "models": {str(e.quality): e.id for e in known
                                               if e.quality in qualities},
            "registry": str(registry), "methods": [m if not n else f"{m}-{n}"
                                                   for m, n in methods],
            "sga": {"lr": (sga or [PAPER])[0].learning_rate, "tau0": PAPER.tau0,
                    "c": PAPER.c, "t0": PAPER.t0, "seed": args.seed,
                    "schedule": "paper; one run per image, coded at each budget"
                    if args.sga_schedule == "paper" else
                    "scaled (t0, c stretched onto each budget); one run per budget"},
            "device": device,
            **baseline_settings(baselines),
            "reference": reference, "psnr": "mean over images of RGB PSNR of decoded 8-bit "
                                            "pixels", "bpp": "mean over images of file bits "
                                                           "per pixel"},
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
        "images": [{"name": im.name, "width": im.rgb.shape[1], "height": im.rgb.shape[0]}
                   for im in images],
        "pixels": pixels,
        "curves": curves,
        **cmp,
    }


def merge(reports: list[dict], reference: str) -> dict:
    """Reports on the same images, split by quality (say, one process per core), as one.

    sgarc points are pooled per curve; a classical curve measured by several reports is the
    same measurement of the same images, so the first one's is kept.
    """
    same = ("dirs", "limit", "crop", "sga")  # same images, crops and SGA settings
    first = reports[0]
    if any(r["images"] != first["images"] or any(r["settings"].get(k) != first["settings"]
                                                  .get(k) for k in same)
           for r in reports[1:]):
        raise SgarcError("--merge: the reports measured different images or settings")
    qualities = [q for r in reports for q in r["settings"]["qualities"]]
    if len(set(qualities)) != len(qualities):
        raise SgarcError("--merge: a quality level is in more than one report")
    curves: dict[str, dict] = {}
    for r in reports:
        for name, curve in r["curves"].items():
            if name not in curves:
                curves[name] = {**curve, "points": list(curve["points"])}
            elif curve["kind"] == "sgarc":
                curves[name]["points"] += curve["points"]
    for curve in curves.values():
        if curve["kind"] == "sgarc":
            curve["points"].sort(key=lambda p: p["setting"])
    settings = dict(first["settings"])
    settings["qualities"] = sorted(qualities)
    settings["models"] = {k: v for r in reports for k, v in r["settings"]["models"].items()}
    settings["reference"] = reference
    return {**first, "settings": settings, "curves": curves,
            "seconds": sum(r["seconds"] for r in reports),
            "merged_from": [r["created"] for r in reports], **compare(curves, reference)}


def cmd_eval(args) -> int:
    if args.reference not in BASELINES and not args.reference.startswith("sgarc-"):
        raise SgarcError(f"--reference must be one of {', '.join(BASELINES)} or an sgarc "
                         f"curve name, not {args.reference!r}")
    if args.merge:
        report = merge([json.loads(Path(f).read_text()) for f in args.dirs], args.reference)
        args.dirs, args.crop = report["settings"]["dirs"], report["settings"]["crop"]
    else:
        report = evaluate(args)
    for line in _table(report["curves"], report):
        print(line)
    if args.json:
        from codec.files import atomic_write
        atomic_write(Path(args.json), (json.dumps(report, indent=1, allow_nan=False) + "\n")
                     .encode())
        print(f"wrote {args.json}")
    if args.plot:
        dirs = ", ".join(Path(d).resolve().parent.name + "/" + Path(d).name for d in args.dirs)
        crop = f", {args.crop} centre crops" if args.crop else ""
        plot(report["curves"], Path(args.plot),
             f"{dirs}: {len(report['images'])} images{crop}")
        print(f"wrote {args.plot}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `sgarc eval` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="rate-distortion of sgarc and classical codecs on a folder of images",
        description="Encode and decode every image under DIR with each shipped quality level "
        "(amortized, and SGA at --sga-iterations) and with JPEG 4:2:0 / 4:4:4, WebP, JPEG "
        "2000, AVIF and JPEG XL at a sweep of settings; report mean bpp (file sizes) and "
        "mean RGB PSNR per point, BD-rates against --reference, and sgarc's rate saving at "
        "equal PSNR against each classical curve. Evaluate on val folders only.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="image folder(s), searched "
                   "recursively (with --merge: the JSON reports to merge)")
    p.add_argument("--quality", "-q", default=None, metavar="Q[,Q...]",
                   help="quality levels (default: every shipped one)")
    p.add_argument("--model", action="append", default=None, metavar="ID",
                   help="evaluate this model (repeatable) instead of the fixed-rate zoo: a "
                        "variable-rate model at --rates; add --zoo to measure the zoo too")
    p.add_argument("--rates", default=None, metavar="R[,R...]",
                   help="rate points (grid indices) of a variable-rate --model (default: its "
                        "trained λ points)")
    p.add_argument("--zoo", action="store_true",
                   help="with --model: also measure the fixed-rate levels (--quality)")
    p.add_argument("--sga-iterations", default="", metavar="N[,N...]",
                   help="also evaluate SGA at these iteration counts, e.g. 100,500 (about "
                        "0.1 s per iteration at 481x321 on a 2-core CPU)")
    p.add_argument("--sga-schedule", choices=("scaled", "paper"), default="scaled",
                   help="SGA's temperature schedule: scaled (default; what sgarc encode and "
                        "job specs use: annealed within each budget, lr 1e-2) or paper (its "
                        "fixed t0 = 700, c = 1e-3, lr 5e-3; one run coded at each budget)")
    p.add_argument("--no-amortized", action="store_true", help="skip the amortized curve")
    p.add_argument("--baselines", default="all",
                   help=f"comma-separated classical curves ({', '.join(BASELINES)}), all "
                        "(default) or none")
    p.add_argument("--reference", default="webp",
                   help="curve the BD-rates are computed against (default: webp)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="the first N images (sorted by path)")
    p.add_argument("--crop", default=None, metavar="WxH", help="centre crops of this size")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write everything (per image, per point, comparisons, settings, "
                        "machine) as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot the RD curves")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of SGA's stochastic rounding")
    p.add_argument("--registry", default=None, metavar="JSON",
                   help="model registry (default: the shipped one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--merge", action="store_true",
                   help="instead of measuring, merge the --json reports given as DIR (runs of "
                        "the same images split by --quality) into one table, JSON and plot")
    p.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.evaluate ARGS`` is ``sgarc eval ARGS``."""
    from jobs.cli import run_as
    return run_as("eval", argv)


if __name__ == "__main__":
    sys.exit(main())
