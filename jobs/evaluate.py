"""`sgarc eval`: rate-distortion of sgarc against classical codecs, measured in one run.

    sgarc eval ../shared/data/bsds500/val --json rd.json --plot rd.png
    sgarc eval ../shared/data/bsds500/val --limit 8 --sga-iterations 100,500 --json sga.json

Every image (sorted by path; ``--limit``, ``--crop WxH`` centre crops) is encoded and
decoded back for every curve; a point is the mean over images of the file's bits per
pixel and of the RGB PSNR. The sgarc curves are one point per model (amortized, and SGA
at each ``--sga-iterations``); the classical ones sweep :data:`BASELINES`. The
comparisons (codec.metrics: BD-rate and BD-PSNR against ``--reference``, sgarc's rate
saving at equal PSNR, SGA's gain over amortized) and the codecs' settings are in
docs/results.md ("Set-up").
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from codec.errors import SgarcError

# name -> (label, parameter, settings of the sweep)
BASELINES: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "jpeg-420": ("JPEG 4:2:0", "quality", (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)),
    "jpeg-444": ("JPEG 4:4:4", "quality", (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)),
    "webp": ("WebP", "quality", (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)),
    "jpeg2000": ("JPEG 2000", "bpp target", (0.1, 0.15, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0,
                                             3.0)),
    "avif": ("AVIF", "quality", (10, 20, 30, 40, 50, 60, 70, 80, 90)),
    "jpegxl": ("JPEG XL", "distance", (12, 8, 6, 4, 3, 2, 1.5, 1, 0.75, 0.5)),
}
AVIF_SPEED = 6
_CLASSICAL_COLORS = {"jpeg-420": "#8c564b", "jpeg-444": "#c49c94", "webp": "#7f7f7f",
                     "jpeg2000": "#e377c2", "avif": "#000000", "jpegxl": "#aec7e8"}
WEBP_METHOD = 6


# ---------------------------------------------------------------------------- classical codecs


def _pillow_encode(rgb: np.ndarray, fmt: str, **params) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **params)
    return buf.getvalue()


def _pillow_decode(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _codec_for(name: str) -> tuple[Callable[[np.ndarray, float], bytes],
                                  Callable[[bytes], np.ndarray]]:
    """(encode(rgb, setting) -> bytes, decode(bytes) -> rgb) of a classical curve."""
    if name in ("jpeg-420", "jpeg-444"):
        sub = 2 if name == "jpeg-420" else 0
        return (lambda rgb, q: _pillow_encode(rgb, "JPEG", quality=int(q), subsampling=sub,
                                              optimize=True)), _pillow_decode
    if name == "jpeg2000":
        return (lambda rgb, b: _pillow_encode(rgb, "JPEG2000", quality_mode="rates",
                                              quality_layers=[24.0 / b], irreversible=True,
                                              mct=1)), _pillow_decode
    import imagecodecs
    if name == "webp":
        return ((lambda rgb, q: bytes(imagecodecs.webp_encode(rgb, level=q, lossless=False,
                                                              method=WEBP_METHOD))),
                imagecodecs.webp_decode)
    if name == "avif":
        return ((lambda rgb, q: bytes(imagecodecs.avif_encode(rgb, level=int(q),
                                                              speed=AVIF_SPEED,
                                                              pixelformat="yuv444"))),
                imagecodecs.avif_decode)
    if name == "jpegxl":
        return ((lambda rgb, d: bytes(imagecodecs.jpegxl_encode(rgb, distance=float(d)))),
                imagecodecs.jpegxl_decode)
    raise ValueError(f"unknown baseline {name!r}")


def available_baselines() -> dict[str, str]:
    """Baselines this machine cannot run, with the reason (an empty dict: all can run)."""
    from PIL import features
    missing = {}
    if not features.check("jpg"):
        missing |= {"jpeg-420": "Pillow without libjpeg", "jpeg-444": "Pillow without libjpeg"}
    if not features.check("jpg_2000"):
        missing["jpeg2000"] = "Pillow without OpenJPEG"
    try:
        import imagecodecs
    except ImportError:
        return missing | dict.fromkeys(("webp", "avif", "jpegxl"), "imagecodecs not installed")
    for name, codec in (("webp", "WEBP"), ("avif", "AVIF"), ("jpegxl", "JPEGXL")):
        if not getattr(imagecodecs, codec).available:
            missing[name] = f"imagecodecs built without {codec}"
    return missing


# ---------------------------------------------------------------------------- images


@dataclass
class EvalImage:
    name: str  # path relative to its folder
    rgb: np.ndarray  # uint8 (H, W, 3)
    prepared: Any  # codec.images.PreparedImage of exactly these pixels, no metadata


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


def load_images(folders: list[str], limit: int | None = None,
                crop: tuple[int, int] | None = None) -> list[EvalImage]:
    """Images under the folders, sorted by path per folder, RGB, optionally centre-cropped."""
    from codec.images import PreparedImage, load_image
    from codec.train import image_files

    files: list[tuple[Path, Path]] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise SgarcError(f"{folder}: not a folder")
        files += [(root, f) for f in image_files([root])]
    if limit is not None:
        files = files[:limit]
    if not files:
        raise SgarcError(f"no images under {', '.join(folders)}")
    out = []
    for root, f in files:
        im = load_image(f, alpha="flatten", depth="reduce", metadata="drop-oversized")
        rgb = im.rgb
        if crop is not None:
            w, h = min(crop[0], rgb.shape[1]), min(crop[1], rgb.shape[0])
            top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
            rgb = rgb[top:top + h, left:left + w]
        rgb = np.ascontiguousarray(rgb)
        info = dataclasses.replace(im.info, width=rgb.shape[1], height=rgb.shape[0],
                                   color="RGB", has_alpha=False, orientation=1, bit_depth=8)
        out.append(EvalImage(f.relative_to(root).as_posix(), rgb,
                             PreparedImage(rgb, None, info, None)))
    return out


# ---------------------------------------------------------------------------- measuring


def _point(setting: Any, rows: list[dict], **extra) -> dict:
    return {"setting": setting, **extra,
            "bpp": float(np.mean([r["bpp"] for r in rows])),
            "psnr": float(np.mean([r["psnr"] for r in rows])),
            "seconds": float(np.mean([r["seconds"] for r in rows])),
            "per_image": rows}


def measure_baseline(name: str, images: list[EvalImage], settings=None, bar=None) -> dict:
    from codec.metrics import bpp, psnr

    label, parameter, sweep = BASELINES[name]
    encode, decode = _codec_for(name)
    points = []
    for s in settings or sweep:
        rows = []
        for im in images:
            t0 = time.perf_counter()
            data = encode(im.rgb, s)
            seconds = time.perf_counter() - t0
            out = np.asarray(decode(data))
            if out.shape != im.rgb.shape or out.dtype != np.uint8:
                raise RuntimeError(f"{name} at {s} decoded {im.name} to {out.shape} "
                                   f"{out.dtype}, expected {im.rgb.shape} uint8")
            h, w = im.rgb.shape[:2]
            rows.append({"image": im.name, "bytes": len(data), "bpp": bpp(len(data), w, h),
                         "psnr": psnr(out, im.rgb), "seconds": seconds})
            if bar is not None:
                bar.update(1)
        points.append(_point(s, rows))
    return {"kind": "classical", "label": label, "parameter": parameter, "points": points}


def measure_sgarc(codec, images: list[EvalImage], config, bar=None) -> dict[int, dict]:
    """One point per budget: every image encoded with `config`, decoded back on the CPU.

    An iterative config runs once per image up to its largest snapshot (config.snapshots,
    else config.iterations) and is coded at each snapshot: under the paper's schedule that
    is what separate runs of each length give (Codec.encode_snapshots).
    """
    from dataclasses import replace

    from codec.api import decode
    from codec.metrics import psnr

    entry = codec.lm.entry
    iterative = config.method != "amortized" and config.iterations > 0
    budgets = sorted(set(config.snapshots) or {config.iterations}) if iterative else [0]
    config = replace(config, iterations=max(budgets), snapshots=tuple(budgets))
    rows: dict[int, list[dict]] = {n: [] for n in budgets}
    for im in images:
        if iterative:
            results = codec.encode_snapshots(im.prepared, config, progress=(
                bar.update if bar is not None else None))
        else:
            results = {0: codec.encode(im.prepared, config)}
            if bar is not None:
                bar.update(1)
        for n, result in results.items():
            decoded = decode(result.data, device="cpu", registry=codec.registry)
            mse = float(np.mean((decoded.rgb.astype(np.float64) - im.rgb) ** 2)) / 255.0**2
            rows[n].append({"image": im.name, "bytes": len(result.data), "bpp": result.bpp,
                            "psnr": psnr(decoded.rgb, im.rgb), "seconds": result.seconds,
                            "rd_loss": result.bpp + entry.lmbda * 255.0**2 * mse,
                            "estimated_bpp": result.estimated_bits / (im.rgb.shape[0]
                                                                      * im.rgb.shape[1])})
    points = {}
    for n, r in rows.items():
        points[n] = _point(entry.quality if codec.rate is None else codec.rate, r,
                           model=entry.id, lmbda=entry.lmbda, rate=codec.rate)
        points[n]["rd_loss"] = float(np.mean([row["rd_loss"] for row in r]))
    return points


# ---------------------------------------------------------------------------- comparisons


def _xy(curve: dict) -> list[tuple[float, float]]:
    return [(p["bpp"], p["psnr"]) for p in curve["points"]]


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


def compare(curves: dict[str, dict], reference: str, method: str = "pchip") -> dict:
    """BD-rates / BD-PSNRs against the reference, savings at equal PSNR, SGA gains."""
    from codec.metrics import bd_psnr, bd_rate, rate_saving

    classical = [n for n, c in curves.items() if c["kind"] == "classical"]
    ref = curves.get(reference)
    out: dict[str, Any] = {"reference": reference, "bd_method": method, "bd_rate": {},
                           "bd_psnr": {}, "rate_saving": {}, "sga_gain": {}}
    for name, curve in curves.items():
        if ref is None or name == reference:
            continue
        out["bd_rate"][name] = _finite(bd_rate(_xy(curve), _xy(ref), method))
        out["bd_psnr"][name] = _finite(bd_psnr(_xy(curve), _xy(ref), method))
    for name, curve in curves.items():
        if curve["kind"] != "sgarc":
            continue
        out["rate_saving"][name] = {
            c: [_finite(rate_saving((p["bpp"], p["psnr"]), _xy(curves[c]), method))
                for p in curve["points"]] for c in classical}
    for name, curve in curves.items():
        # the amortized curve of the same model: "<prefix>-sga-N" -> "<prefix>-amortized"
        base = curves.get(name.rsplit("-sga-", 1)[0] + "-amortized")
        if curve["kind"] != "sgarc" or curve["method"] == "amortized" or base is None:
            continue
        gains = []
        for p in curve["points"]:
            a = next((q for q in base["points"] if q["setting"] == p["setting"]), None)
            if a is None:
                continue
            bridged = {}
            for c in classical:
                s_new = rate_saving((p["bpp"], p["psnr"]), _xy(curves[c]), method)
                s_old = rate_saving((a["bpp"], a["psnr"]), _xy(curves[c]), method)
                bridged[c] = (None if s_new is None or s_old is None
                              else _finite(((1 + s_new / 100) / (1 + s_old / 100) - 1) * 100))
            gains.append({"quality": p["setting"],
                          "bpp_change_pct": (p["bpp"] / a["bpp"] - 1) * 100,
                          "psnr_change_db": p["psnr"] - a["psnr"],
                          "rd_loss_change_pct": (p["rd_loss"] / a["rd_loss"] - 1) * 100,
                          "rate_saving_at_equal_psnr_via": bridged})
        out["sga_gain"][name] = {
            "points": gains,
            "bd_rate_vs_amortized": _finite(bd_rate(_xy(curve), _xy(base), method))}
    return out


# ---------------------------------------------------------------------------- report


def machine() -> dict:
    import PIL
    import torch
    from PIL import features

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "pillow": PIL.__version__, "libjpeg": features.version("jpg"),
            "openjpeg": features.version("jpg_2000"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import imagecodecs
        libs = dict(v.rsplit("-", 1) for v in imagecodecs.version().split(", ") if "-" in v)
        info["imagecodecs"] = imagecodecs.__version__
        info |= {k: libs.get(k) for k in ("libwebp", "libavif", "libjxl")}
    except ImportError:
        pass
    return info


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


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SgarcError(f"{what} must be a comma-separated list of integers, not "
                         f"{text!r}") from None
    if any(v < 1 for v in values):
        raise SgarcError(f"{what} must be positive")
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
        rates = (_int_list(args.rates, "--rates") if args.rates
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
    images = load_images(args.dirs, args.limit, parse_crop(args.crop))
    pixels = sum(im.rgb.shape[0] * im.rgb.shape[1] for im in images)

    work = len(images) * (sum(len(BASELINES[b][2]) for b in baselines)
                          + len(sgarc_points) * ((not args.no_amortized) + max(iterations,
                                                                             default=0)))
    bar = tqdm(total=work, desc="eval", unit="step", dynamic_ncols=True, disable=args.quiet,
               file=sys.stderr, mininterval=2.0)
    curves: dict[str, dict] = {}
    device = None
    t0 = time.time()
    try:
        for prefix, label_prefix, make in sgarc_points:
            codec = make()
            runs = ([] if args.no_amortized else [InferenceConfig(method="amortized")]) + (
                [replace(PAPER, iterations=max(iterations), snapshots=tuple(iterations),
                         seed=args.seed)] if iterations else [])
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
            "sga": {"lr": PAPER.learning_rate, "tau0": PAPER.tau0,
                    "c": PAPER.c, "t0": PAPER.t0, "seed": args.seed,
                    "schedule": "paper; one run per image, coded at each budget"},
            "device": device,
            "baselines": {b: {"label": BASELINES[b][0], "parameter": BASELINES[b][1],
                              "sweep": list(BASELINES[b][2])} for b in baselines},
            "avif": {"speed": AVIF_SPEED, "pixelformat": "yuv444"},
            "webp": {"method": WEBP_METHOD},
            "jpeg": {"optimize": True},
            "jpeg2000": {"quality_mode": "rates", "irreversible": True, "mct": 1},
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
