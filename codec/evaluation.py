"""Rate-distortion measurement: sgarc and classical codecs on the same images (``sgarc eval``).

A curve is a list of points; a point is the mean over images of the file's bits per pixel
and of the RGB PSNR of the decoded 8-bit pixels. :func:`measure_sgarc` gives one point per
model and iteration budget, :func:`measure_baseline` sweeps a classical codec's setting
(:data:`BASELINES`, settings in docs/results.md, "Set-up"), :func:`compare` turns curves
into BD-rates (codec.metrics). ``jobs.evaluate`` is the command around it; ``bench/``
uses the same pieces.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
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

    Under the paper's schedule an iterative config runs once per image up to its largest
    snapshot (config.snapshots, else config.iterations) and is coded at each: that is what
    separate runs of each length give (Codec.encode_snapshots). Any other config (the
    scaled schedule depends on the budget) is one encoding per image, as `sgarc encode`.
    """
    from dataclasses import replace

    from codec.api import decode
    from codec.metrics import psnr

    entry = codec.lm.entry
    iterative = config.method != "amortized" and config.iterations > 0
    snapshots = iterative and config.schedule == "paper"
    if snapshots:
        budgets = sorted(set(config.snapshots) or {config.iterations})
        config = replace(config, iterations=max(budgets), snapshots=tuple(budgets))
    else:
        budgets = [config.iterations if iterative else 0]
    rows: dict[int, list[dict]] = {n: [] for n in budgets}
    progress = bar.update if bar is not None and iterative else None
    for im in images:
        if snapshots:
            results = codec.encode_snapshots(im.prepared, config, progress=progress)
        else:
            results = {budgets[0]: codec.encode(im.prepared, config, progress=progress)}
            if bar is not None and not iterative:
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



def baseline_settings(baselines: list[str]) -> dict[str, Any]:
    """The classical codecs' settings, as a report records them."""
    return {"baselines": {b: {"label": BASELINES[b][0], "parameter": BASELINES[b][1],
                              "sweep": list(BASELINES[b][2])} for b in baselines},
            "avif": {"speed": AVIF_SPEED, "pixelformat": "yuv444"},
            "webp": {"method": WEBP_METHOD},
            "jpeg": {"optimize": True},
            "jpeg2000": {"quality_mode": "rates", "irreversible": True, "mct": 1}}
