#!/usr/bin/env python
"""Codec speed on one 768x512 photo, each time beside its floor from FLOPs and measured peak.

    python bench/codec_speed.py                      # default model, CPU, all threads
    python bench/codec_speed.py --quality 4 --threads 1 --repeats 3 --json speed.json
    python bench/codec_speed.py --device cuda --sga-batch 8    # SGA on 8 images at once

`measure(SpeedSettings(...))` does the same from Python and returns the report as a dict
(what --json writes); the suite `python -m bench` builds its summary from it.

Measured in one run, nothing hard-coded:

* the machine's peak (bench.common.measure_peaks): best-of-several float32 GEMM (torch.mm,
  n x n) and a 5x5 convolution at the thread count of the timed runs, on CUDA also TF32 and
  bf16 GEMMs; and a float64 GEMM on the CPU, because the exact integer hyper-synthesis
  (codec.frozen.hyper_synthesis_exact) runs float64 convolutions there;
* the model's FLOPs: forward hooks on every Conv2d / ConvTranspose2d (2 * MACs; a transposed
  conv does in * out * k^2 / groups MACs per *input* position) and GDN (its C x C matmul over
  positions: 2 * C^2 per position). Biases, activations, GDN's elementwise part and the
  likelihoods are not counted. Cross-checked with torch.utils.flop_counter;
* wall-clock times (time.perf_counter; best of --repeats, medians in the JSON) of the
  amortized encode end to end and its parts, of one SGA iteration (infer with 2 + n
  iterations minus infer with 2, divided by n, so the amortized start cancels out; with
  --sga-batch B on B copies of the image, divided by B as well) and of decode end to end
  and its parts.

floor = FLOPs / peak: the time the arithmetic would take at the measured GEMM rate;
measured / floor says how far from that the code runs. Entropy coding, bitstream handling
and elementwise work have no FLOP floor (shown as "-"). This is a tool, not a test: no
timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # runnable as `python bench/codec_speed.py` without install
    sys.path.insert(0, str(_ROOT))

from bench.common import (  # noqa: E402
    busy_cpus,
    cpu_model,
    device_name,
    log,
    machine_info,
    measure_peaks,
    synchronizer,
    timed,
    timed_round_robin,
)
from codec import coding  # noqa: E402
from codec.api import Codec, decode, latent_shapes  # noqa: E402
from codec.bitstream import parse  # noqa: E402
from codec.errors import ModelError  # noqa: E402
from codec.frozen import LATENT_LIMIT, hyper_synthesis_exact  # noqa: E402
from codec.gdn import GDN  # noqa: E402
from codec.images import PreparedImage, load_image  # noqa: E402
from codec.inference import InferenceConfig, infer  # noqa: E402
from codec.model import DOWNSAMPLE  # noqa: E402
from codec.registry import REGISTRY  # noqa: E402

WIDTH, HEIGHT = 768, 512
REST_NOTE = "= end to end - parts (timed apart: ~0 is within noise)"
_WORD = np.dtype(">u4")  # latent streams are big-endian 32-bit words (codec.api)


# ------------------------------------------------------------------------------ image


def synthetic_image(seed: int = 0) -> np.ndarray:
    """Deterministic photo-like RGB: smooth gradients, oriented texture, a few edges, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    u, v = xx / WIDTH, yy / HEIGHT
    img = np.empty((HEIGHT, WIDTH, 3))
    for c in range(3):
        sky = 60 + 150 * (1 - v) * (0.6 + 0.4 * np.cos(2.0 * u + c))
        texture = 18 * np.sin(xx / (3.0 + c) + 5 * np.sin(yy / 37.0)) * np.cos(yy / 7.0 - c)
        img[..., c] = sky + texture * (v > 0.45)
    for cx, cy, r, col in [(0.3, 0.6, 0.12, (200, 60, 40)), (0.7, 0.35, 0.09, (30, 90, 170))]:
        disc = (u - cx) ** 2 * (WIDTH / HEIGHT) ** 2 + (v - cy) ** 2 < r**2
        img[disc] = col
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def astronaut_image() -> np.ndarray:
    """scikit-image's astronaut (512x512), Lanczos-resized to 768x768, centre 512 rows."""
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize((WIDTH, WIDTH), Image.Resampling.LANCZOS)
    top = (WIDTH - HEIGHT) // 2
    return np.asarray(im)[top:top + HEIGHT].copy()


def make_image(kind: str) -> tuple[np.ndarray, str]:
    if kind in ("auto", "astronaut"):
        try:
            return astronaut_image(), ("photo: skimage.data.astronaut, Lanczos 512->768 px, "
                                       "centre crop")
        except ImportError:
            if kind == "astronaut":
                raise SystemExit("--image astronaut needs scikit-image (pip install -e .[dev])"
                                 ) from None
    return synthetic_image(), "synthetic photo-like (numpy: gradients + texture + noise, seed 0)"


def prepared(rgb: np.ndarray) -> PreparedImage:
    """Through the codec's own loader, as a PNG, like any input file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return load_image(buf.getvalue())


# ------------------------------------------------------------------------------ FLOPs


def layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        positions = inp.shape[0] * inp.shape[2] * inp.shape[3]
        macs = module.in_channels * module.out_channels * kh * kw * positions / module.groups
    elif isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        positions = out.shape[0] * out.shape[2] * out.shape[3]
        macs = module.in_channels * module.out_channels * kh * kw * positions / module.groups
    elif isinstance(module, GDN):
        B, C, H, W = inp.shape
        macs = C * C * B * H * W
    else:
        return 0.0
    return 2.0 * macs


def count_flops(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """FLOPs of one forward of module on x, by hooks on its conv / deconv / GDN layers."""
    total = [0.0]

    def hook(m, inputs, output):
        total[0] += layer_flops(m, inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, GDN))]
    try:
        with torch.inference_mode():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    return total[0], out


def flop_counter_check(model, x, lmbda: float) -> dict | None:
    """torch.utils.flop_counter's count of the network forward and of one real SGA iteration."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None

    def counted(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    size = [(x.shape[2], x.shape[3])]

    def sga(n: int):
        return lambda: infer(model, x, size, lmbda, InferenceConfig(method="sga", iterations=n))

    with torch.no_grad():
        y = model.g_a(x)
        z = torch.round(model.h_a(y))
    out = {}
    for name, mod, inp in [("g_a", model.g_a, x), ("h_a", model.h_a, y), ("h_s", model.h_s, z),
                           ("g_s", model.g_s, y)]:
        out[name] = counted(lambda mod=mod, inp=inp: _no_grad_call(mod, inp))
    out["sga_iteration"] = counted(sga(2)) - counted(sga(1))  # eval_every=1
    return out


def _no_grad_call(mod, inp):
    with torch.no_grad():
        return mod(inp)


# ------------------------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    seconds: list[float] | None = None  # samples, or None for a derived row
    derived_s: float | None = None
    floor_s: float | None = None
    level: int = 0
    note: str = ""
    key: str = ""  # stable name for the rows the suite reads (python -m bench)

    @property
    def best_s(self) -> float:
        return min(self.seconds) if self.seconds else float(self.derived_s)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def as_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "level": self.level,
                "measured_ms": 1e3 * self.best_s,
                "median_ms": None if self.median_s is None else 1e3 * self.median_s,
                "samples_ms": [1e3 * s for s in self.seconds] if self.seconds else None,
                "floor_ms": None if self.floor_s is None else 1e3 * self.floor_s,
                "ratio": None if self.floor_s is None else self.best_s / self.floor_s,
                "note": self.note}


def format_table(rows: list[dict]) -> str:
    """The rows of a report (Row.as_dict) as a text table."""
    width = max(len("  " * r["level"] + r["name"]) for r in rows) + 2
    head = f"{'operation':<{width}}{'measured ms':>12}{'floor ms':>11}{'measured/floor':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        floor = f"{r['floor_ms']:11.2f}" if r["floor_ms"] else f"{'-':>11}"
        ratio = f"{r['ratio']:15.1f}x" if r["floor_ms"] else f"{'-':>16}"
        name = "  " * r["level"] + r["name"]
        lines.append(f"{name:<{width}}{r['measured_ms']:12.2f}{floor}{ratio}"
                     + (f"  {r['note']}" if r["note"] else ""))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """Header, table and notes of a report from `measure`, as the CLI prints them."""
    return "\n\n".join(["\n".join(report["header"]), format_table(report["rows"]),
                        "\n".join(report["notes"])])


# ---------------------------------------------------------------------------- measure


@dataclass
class SpeedSettings:
    """What `measure` times and how; the command line's options."""

    model: str | int | None = None  # id or quality level; None: the registry's default
    registry: Path = REGISTRY
    device: str = "cpu"  # the networks; entropy coding and the exact h_s stay on the CPU
    threads: int | None = None  # torch CPU threads; None: torch's default
    repeats: int = 5
    sga: bool = True  # False: no SGA timing (encode and decode only)
    sga_iterations: int = 10
    sga_repeats: int | None = None  # None: min(repeats, 3)
    sga_batch: int = 1  # images per SGA batch; times are reported per image
    eval_every: int = InferenceConfig.eval_every  # the product default
    backward_factor: float = 2.0
    gemm_size: int | None = None  # None: 2048 on the CPU, 8192 on CUDA
    gemm_runs: int = 5
    peak: str = "max"  # "max": better of GEMM and conv; "gemm": GEMM only
    image: str = "auto"
    flop_check: bool = True


def measure(s: SpeedSettings) -> dict:
    """Time amortized encode, SGA and decode of a 768x512 image; the report as a dict."""
    saved_threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        return _measure(s)
    finally:
        torch.set_num_threads(saved_threads)


def _measure(s: SpeedSettings) -> dict:
    threads = torch.get_num_threads()
    device = torch.device(s.device)
    sync = synchronizer(device)
    R = s.repeats
    others = busy_cpus()
    busy = others is not None and others + threads > (os.cpu_count() or 1) + 0.25
    if busy:
        log(f"warning: other processes keep {others:.1f} of {os.cpu_count()} CPUs busy; with "
            f"{threads} threads the timings will be contended (try --threads)")
    sga_R = s.sga_repeats or min(R, 3)
    n_sga, B = s.sga_iterations, s.sga_batch

    # ---- machine peaks (same thread count as everything below)
    log(f"peaks on {device}: GEMMs and a 5x5 conv, best of {s.gemm_runs} ...")
    peaks = measure_peaks(device, s.gemm_size, s.gemm_runs, s.peak)
    peak32, peak64 = peaks.fp32, peaks.fp64_cpu

    # ---- model, image
    try:
        codec = Codec(s.model, device=device, registry=s.registry)
    except ModelError as exc:
        raise SystemExit(f"error: {exc}") from None
    lm = codec.lm
    entry, model = lm.entry, codec.model  # the networks on `device`
    rgb, image_desc = make_image(s.image)
    image = prepared(rgb)
    assert (image.info.width, image.info.height) == (WIDTH, HEIGHT)
    assert HEIGHT % DOWNSAMPLE == 0 and WIDTH % DOWNSAMPLE == 0  # no padding at this size
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255.0).to(device)
    sizes = [(HEIGHT, WIDTH)]

    # ---- FLOPs (hooks), one forward of each network; doubles as a warm-up
    log("counting FLOPs ...")
    flops: dict[str, float] = {}
    flops["g_a"], y = count_flops(model.g_a, x)
    flops["h_a"], z = count_flops(model.h_a, y)
    z_r = torch.round(z)
    flops["h_s"], _ = count_flops(model.h_s, z_r)
    y_r = torch.round(y)
    flops["g_s"], _ = count_flops(model.g_s, y_r)
    flops["h_s_exact"] = flops["h_s"]  # same convolutions, in float64 on the CPU
    check = flop_counter_check(model, x, entry.lmbda) if s.flop_check and s.sga else None

    def t32(f: float) -> float:
        return f / peak32

    net_flops = flops["g_a"] + flops["h_a"] + flops["h_s"] + flops["g_s"]
    syn_flops = flops["h_s"] + flops["g_s"]
    sga_flops = s.backward_factor * syn_flops + syn_flops / s.eval_every
    floor = {
        "encode": t32(net_flops) + flops["h_s_exact"] / peak64,
        "network": t32(net_flops),
        "sga": t32(sga_flops),
        "decode": t32(flops["g_s"]) + flops["h_s_exact"] / peak64,
        "h_s_exact": flops["h_s_exact"] / peak64,
        **{k: t32(flops[k]) for k in ("g_a", "h_a", "h_s", "g_s")},
    }

    # ---- amortized encode and decode, end to end and their parts. Each group is timed
    # round robin (one warm-up of each, then R rounds) so that a change of machine load
    # hits the whole and its parts alike.
    amortized = InferenceConfig(method="amortized")
    result = codec.encode(image, amortized)
    data = result.data
    lat = infer(model, x, sizes, entry.lmbda, amortized)
    z_hat = lat.z_hat[0].clamp(-LATENT_LIMIT, LATENT_LIMIT).cpu().numpy()
    k = lat.k[0].clamp(-LATENT_LIMIT, LATENT_LIMIT).cpu().numpy()
    mu, index = hyper_synthesis_exact(lm.tables, z_hat[None])
    bs = parse(data)
    z_shape, y_shape = latent_shapes(lm, WIDTH, HEIGHT, bs.header.pad_mode)
    z_words = np.frombuffer(bs.sections["ZLAT"], _WORD).astype(np.uint32)
    y_words = np.frombuffer(bs.sections["YLAT"], _WORD).astype(np.uint32)
    assert np.array_equal(coding.decode_z(lm.tables, z_words, z_shape), z_hat)
    y_hat = torch.as_tensor(mu[0] + k, dtype=torch.float32, device=device)[None]

    def chain():
        with torch.inference_mode():
            yy = model.g_a(x)
            zz = model.h_a(yy)
            model.h_s(torch.round(zz))
            return model.g_s(torch.round(yy))

    def fwd(mod, inp):
        def f():
            with torch.inference_mode():
                return mod(inp)
        return f

    log(f"amortized encode: end to end and parts x{R} ...")
    enc = timed_round_robin({
        "encode": lambda: codec.encode(image, amortized),
        "network": chain,
        "g_a": fwd(model.g_a, x), "h_a": fwd(model.h_a, y),
        "h_s": fwd(model.h_s, z_r), "g_s": fwd(model.g_s, y_r),
        "exact": lambda: hyper_synthesis_exact(lm.tables, z_hat[None]),
        "entropy_encode": lambda: (coding.encode_z(lm.tables, z_hat),
                                   coding.encode_y(lm.tables, k, index[0])),
    }, R, sync)
    enc_s, net_s, exact_s = enc["encode"], enc["network"], enc["exact"]
    ent_enc_s = enc["entropy_encode"]
    part_s = {name: enc[name] for name in ("g_a", "h_a", "h_s", "g_s")}

    # entropy decoding is also the encoder's verification
    log(f"decode: end to end and parts x{R} ...")
    dec = timed_round_robin({
        "decode": lambda: decode(data, device=str(device), registry=s.registry),
        "z": lambda: coding.decode_z(lm.tables, z_words, z_shape),
        "y": lambda: coding.decode_y(lm.tables, y_words, index[0]),
        "exact": lambda: hyper_synthesis_exact(lm.tables, z_hat[None]),
        "g_s": fwd(model.g_s, y_hat),
    }, R, sync)
    dec_s, dec_z_s, dec_y_s, gs_dec_s = dec["decode"], dec["z"], dec["y"], dec["g_s"]
    exact_dec_s = dec["exact"]

    # ---- SGA: (infer(2 + n) - infer(2)) / n, the pair interleaved so drift hits both;
    # on B copies of the image at once, then per image
    short_s: list[float] = []
    long_s: list[float] = []
    if s.sga:
        log(f"SGA: infer(2) and infer(2+{n_sga}) on a batch of {B}, x{sga_R} ...")
        xb = x.expand(B, -1, -1, -1).contiguous()

        def sga(iters: int):
            cfg = InferenceConfig(method="sga", iterations=iters, eval_every=s.eval_every)
            return lambda: infer(model, xb, sizes * B, entry.lmbda, cfg)

        timed(sga(2), 0, sync, warmup=1)
        for _ in range(sga_R):
            short_s += timed(sga(2), 1, sync, warmup=0)
            long_s += timed(sga(2 + n_sga), 1, sync, warmup=0)
        sga_iter = (min(long_s) - min(short_s)) / n_sga / B
        sga_pairs = [(b - a) / n_sga / B for a, b in zip(short_s, long_s, strict=True)]

    # ---- rows
    best = min
    ent_dec = best(dec_z_s) + best(dec_y_s)
    enc_other = (best(enc_s) - best(net_s) - 2 * best(exact_s) - best(ent_enc_s) - ent_dec
                 - best(part_s["g_s"]) - best(part_s["h_s"]))
    dec_other = best(dec_s) - ent_dec - best(exact_dec_s) - best(gs_dec_s)
    rows = [
        Row("amortized encode, end to end", enc_s, floor_s=floor["encode"], key="encode"),
        Row("network forward g_a+h_a+h_s+g_s (fp32)", net_s, floor_s=floor["network"],
            level=1),
        *[Row(f"{name} forward", part_s[name], floor_s=floor[name], level=2)
          for name in ("g_a", "h_a", "h_s", "g_s")],
        Row("exact h_s (fp64) x2: coding + verification", derived_s=2 * best(exact_s),
            floor_s=2 * floor["h_s_exact"], level=1),
        Row("entropy encoding z + y", ent_enc_s, level=1),
        Row("entropy decoding z + y (verification)", derived_s=ent_dec, level=1),
        Row("final g_s + rate-estimate h_s (again)",
            derived_s=best(part_s["g_s"]) + best(part_s["h_s"]),
            floor_s=floor["g_s"] + floor["h_s"], level=1),
        Row("rest (likelihoods, bitstream, PSNR, copies)", derived_s=enc_other, level=1,
            note=REST_NOTE),
    ]
    if s.sga:
        per = f" per image, batch of {B}" if B > 1 else ""
        rows.append(Row(f"SGA iteration{per} (eval_every={s.eval_every})", derived_s=sga_iter,
                        floor_s=floor["sga"], key="sga_iteration",
                        note=f"median of pairs {1e3 * statistics.median(sga_pairs):.2f} ms"))
    rows += [
        Row("decode, end to end", dec_s, floor_s=floor["decode"], key="decode"),
        Row("entropy decoding z + y", derived_s=ent_dec, level=1, key="decode_entropy",
            note=f"{100 * ent_dec / best(dec_s):.1f}% of decode"),
        Row("z", dec_z_s, level=2),
        Row("y", dec_y_s, level=2),
        Row("exact h_s (fp64)", exact_dec_s, floor_s=floor["h_s_exact"], level=1),
        Row("synthesis g_s (fp32)", gs_dec_s, floor_s=floor["g_s"], level=1),
        Row("rest (parse, model lookup, to 8-bit)", derived_s=dec_other, level=1,
            note=REST_NOTE),
    ]

    # ---- report
    busy_text = "?" if others is None else f"{others:.1f}"
    gf = {k: v / 1e9 for k, v in flops.items()}
    measured_as = f"measured = best of {R} after 1 warm-up"
    if s.sga:
        batch = f" on a batch of {B}" if B > 1 else ""
        measured_as += f" (SGA: best of {sga_R} pairs infer(2) / infer(2+{n_sga}){batch})"
    header = [
        f"sgarc codec speed: {WIDTH}x{HEIGHT} RGB, {image_desc}",
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({busy_text} busy with other "
        f"work at start), torch {torch.__version__}, {threads} threads"
        + (f", networks on {s.device} ({device_name(device)})" if device.type != "cpu"
           else ""),
        f"model: {entry.id} (quality {entry.quality}, N={entry.N}, M={entry.M}, "
        f"lambda={entry.lmbda}); y {tuple(y_shape)}, z {tuple(z_shape)}; "
        f"{result.bpp:.4f} bpp, PSNR {result.psnr:.2f} dB (amortized)",
        f"peak (best of {s.gemm_runs}) on {s.device}: {peaks.describe()}",
        f"FLOPs (hooks): g_a {gf['g_a']:.3f} G, h_a {gf['h_a']:.3f} G, h_s {gf['h_s']:.3f} G "
        f"(also fp64 exact), g_s {gf['g_s']:.3f} G",
        f"{measured_as}; floor = FLOPs / peak (fp32; fp64 for the exact h_s)",
    ]
    notes = [
        "floors: encode = (g_a+h_a+h_s+g_s)/fp32 peak + h_s/fp64 peak (each network once; "
        "the encoder as written also runs a second g_s, a second float h_s and a second exact "
        "h_s, listed as parts);",
    ]
    if s.sga:
        notes.append(
            f"  SGA iteration = (h_s+g_s) x {s.backward_factor:g} (relaxed forward + backward) "
            f"+ (h_s+g_s) x 1/{s.eval_every} (hard-rounded evaluation) = "
            f"{sga_flops / 1e9:.3f} GFLOP per image at fp32 peak. Assumption: backward = "
            f"{s.backward_factor - 1:g}x forward (infer() freezes the weights, so only input "
            "gradients are computed; 3x is the rule of thumb with weight gradients: "
            f"{1e3 * t32(3 * syn_flops + syn_flops / s.eval_every):.2f} ms floor); "
            "Adam, Gumbel sampling and likelihoods are elementwise and not counted;")
    notes.append("  decode = g_s/fp32 peak + h_s/fp64 peak. Entropy coding has no FLOP floor "
                 "(-).")
    if device.type == "cuda":
        notes.append(f"  fp32 peak on {s.device} = {peaks.fp32_source}; bf16 torch.mm ran at "
                     f"{peaks.probes['bf16_gemm'] / 1e9:.0f} GFLOP/s (not used: the codec runs "
                     "no bf16).")
    if any(r.floor_s and r.best_s < r.floor_s for r in rows):
        notes.append("  ratio < 1: that kernel beat the measured peak (fewer multiplications "
                     "than a direct convolution, or the peak probe was slowed by other load).")
    if busy:
        notes.append(f"WARNING: other processes kept {others:.1f} of {os.cpu_count()} CPUs "
                     f"busy at the start and this run used {threads} threads: timings are "
                     "contended.")
    if check is not None:
        hooks_match = all(abs(check[n] - flops[n]) <= 1e-6 * flops[n]
                          for n in ("g_a", "h_a", "h_s", "g_s"))
        notes.append(
            f"cross-check (torch.utils.flop_counter): forwards "
            f"{'match' if hooks_match else 'DIFFER from'} the hook counts; one real SGA "
            f"iteration (eval_every=1) = {check['sga_iteration'] / 1e9:.3f} GFLOP = "
            f"{check['sga_iteration'] / syn_flops:.2f}x forward(h_s+g_s), floor assumes "
            f"{s.backward_factor + 1:g}x at eval_every=1.")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    return {
        "header": header,
        "image": {"width": WIDTH, "height": HEIGHT, "source": image_desc},
        "machine": machine_info(others) | {"threads": threads, "device": str(device),
                                           "device_name": device_name(device)},
        "model": {"id": entry.id, "quality": entry.quality, "N": entry.N, "M": entry.M,
                  "lmbda": entry.lmbda},
        "encode_result": {"bytes": len(data), "bpp": result.bpp, "psnr": result.psnr},
        "peak_gflops": peaks.as_dict(),
        "gflops": gf,
        "gflops_sga_iteration_floor": sga_flops / 1e9,
        "flop_counter_check_gflops": (None if check is None
                                      else {k: v / 1e9 for k, v in check.items()}),
        "settings": settings | {"repeats": R, "sga_repeats": sga_R},
        "sga_samples_ms": {"batch": B, "infer_2": [1e3 * t for t in short_s],
                           f"infer_{2 + n_sga}": [1e3 * t for t in long_s]},
        "rows": [r.as_dict() for r in rows],
        "notes": notes,
    }


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SpeedSettings()
    p = argparse.ArgumentParser(
        description="Time amortized encode, one SGA iteration and decode of a 768x512 image "
                    "and compare each with its floor (model FLOPs / measured peak).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="model id from the registry")
    which.add_argument("--quality", type=int, help="quality level of a shipped model")
    p.add_argument("--registry", type=Path, default=d.registry,
                   help="registry.json to load the model from (default: the shipped one)")
    p.add_argument("--device", default=d.device, help="torch device for the networks (default "
                   "cpu; entropy coding and the exact hyper-synthesis always run on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every timed run and the peak GEMM "
                        f"(default: torch's default, {torch.get_num_threads()} here)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="timed repeats per measurement, after one warm-up (default 5)")
    p.add_argument("--sga-iterations", type=int, default=d.sga_iterations,
                   help="SGA iterations timed beyond the 2 warm-up ones (default 10)")
    p.add_argument("--sga-repeats", type=int, default=None,
                   help="repeats of the SGA pair infer(2) / infer(2+n) (default: --repeats, "
                        "at most 3)")
    p.add_argument("--sga-batch", type=int, default=d.sga_batch,
                   help="images per SGA batch (copies of the test image); times are per "
                        "image (default 1)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"SGA's hard-loss evaluation period (default {d.eval_every}, the "
                        "product default)")
    p.add_argument("--backward-factor", type=float, default=d.backward_factor,
                   help="floor assumption: FLOPs of relaxed forward + backward over one "
                        "forward (default 2: infer() freezes the weights, so backward only "
                        "computes input gradients; 3 = the rule of thumb with weight grads)")
    p.add_argument("--gemm-size", type=int, default=None,
                   help="n of the peak GEMMs (default 2048 on the CPU, 8192 on CUDA)")
    p.add_argument("--gemm-runs", type=int, default=d.gemm_runs,
                   help="peak = best of this many (5)")
    p.add_argument("--peak", choices=("max", "gemm"), default=d.peak,
                   help="fp32 peak for the floors: max = the better of torch.mm and a 5x5 "
                        "convolution (default), gemm = torch.mm only (TF32 on CUDA when "
                        "cuDNN runs convolutions in TF32)")
    p.add_argument("--image", choices=("auto", "astronaut", "synthetic"), default=d.image,
                   help="test image: auto = astronaut when scikit-image is installed")
    p.add_argument("--no-flop-check", action="store_true",
                   help="skip the torch.utils.flop_counter cross-check (saves ~2 SGA runs)")
    p.add_argument("--json", type=Path, help="also write all results and samples here")
    args = p.parse_args(argv)
    for name in ("repeats", "sga_iterations", "sga_batch", "eval_every", "gemm_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threads", "sga_repeats", "gemm_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def settings_from(args: argparse.Namespace) -> SpeedSettings:
    return SpeedSettings(
        model=args.model if args.model is not None else args.quality, registry=args.registry,
        device=args.device, threads=args.threads, repeats=args.repeats,
        sga_iterations=args.sga_iterations, sga_repeats=args.sga_repeats,
        sga_batch=args.sga_batch, eval_every=args.eval_every,
        backward_factor=args.backward_factor, gemm_size=args.gemm_size,
        gemm_runs=args.gemm_runs, peak=args.peak, image=args.image,
        flop_check=not args.no_flop_check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = measure(settings_from(args))
    print(format_report(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
