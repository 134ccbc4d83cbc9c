"""How fast one training step runs, beside its FLOP floor, for each speed option.

    python bench/train_step.py                   # N=64 M=96, batch 8, 128 px, CPU threads
    python bench/train_step.py --threads 1 --crop 256 --batch-size 4
    python -m bench --only train                 # the same, as a row of the suite

A step is what `sgarc train` does per batch for the variable-rate model (codec.train):
forward with the uniform-noise relaxation at one rate point per crop, the RD loss,
backward, gradient clipping and Adam. Its floor is the step's FLOPs
(torch.utils.flop_counter: convolutions forward and backward, the GDN matmuls) over the
device's measured float32 peak (bench.common.measure_peaks), as for the decode row.

Variants, timed round robin in the same run (so the ratios between them hold on a noisy
machine): `nchw` (plain layout), `channels_last` (what `sgarc train` uses: same math,
oneDNN's fast path) and `channels_last+bf16` (hidden layers under bfloat16 autocast, heads
in float32; `sgarc train --bf16`). Each variant also reports the mean loss of the timed
steps on the same crops from the same weights, so one that hurts the loss shows it.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # python bench/train_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log, machine_info, measure_peaks, synchronizer, timed_round_robin
from codec.train import (
    TrainConfig,
    memory_format_of,
    param_groups,
    rd_loss_terms,
    train_step,
)
from codec.variable_rate import DEFAULT_LMBDAS, GainedMeanScaleHyperprior

VARIANTS = ("nchw", "channels_last", "channels_last+bf16")
TARGET_RATIO = 2.0  # issue: a training step at most 2x its floor on the 2-core CPU


@dataclass
class StepSettings:
    N: int = 64
    M: int = 96
    batch_size: int = 8
    crop: int = 128
    threads: int | None = None
    repeats: int = 5
    device: str = "cpu"
    gemm_size: int = 2048
    gemm_runs: int = 5


class _SameBatch:
    """A crop sampler that gives the same crops and rate points every step, so that every
    variant times `codec.train.train_step` on the same work."""

    def __init__(self, x: torch.Tensor, r: torch.Tensor) -> None:
        self.x, self.r = x, r

    def batch(self, n: int) -> torch.Tensor:
        return self.x[:n]

    def rate_points(self, n: int, num_rates: int) -> torch.Tensor:
        return self.r[:n]


def _step_fn(variant: str, model: GainedMeanScaleHyperprior, x: torch.Tensor, r: torch.Tensor,
             losses: list[float]):
    """One `sgarc train` step (codec.train.train_step) of this variant, as a thunk."""
    cfg = TrainConfig(data=[], lmbdas=model.lmbdas, batch_size=x.shape[0],
                      channels_last=variant.startswith("channels_last"),
                      bf16=variant.endswith("bf16"))
    model = copy.deepcopy(model).to(memory_format=memory_format_of(cfg))
    opt = torch.optim.Adam(param_groups(model, cfg), lr=1e-5)
    sampler = _SameBatch(x, r)

    def step() -> None:
        terms = train_step(model, opt, sampler, cfg, 1e-5, x.device)
        losses.append(terms["loss"].item())

    return step


def step_flops(model: GainedMeanScaleHyperprior, x: torch.Tensor, r: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as fc:
        terms = rd_loss_terms(x, m(x, r), m.lmbdas_tensor(x.device)[r])
        terms["loss"].backward()
    return float(fc.get_total_flops())


def measure(s: StepSettings) -> dict:
    """ms per step of each variant, the FLOP floor, and the mean loss of the timed steps."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GainedMeanScaleHyperprior(s.N, s.M, DEFAULT_LMBDAS).to(device)
    x = torch.rand(s.batch_size, 3, s.crop, s.crop, generator=gen).to(device)
    r = torch.randint(len(DEFAULT_LMBDAS), (s.batch_size,), generator=gen).to(device)
    log(f"train step: N={s.N} M={s.M} batch {s.batch_size} x {s.crop}px on {device}, "
        f"{torch.get_num_threads()} threads")
    flops = step_flops(model, x, r)
    peaks = measure_peaks(device, s.gemm_size, s.gemm_runs)
    floor_ms = 1e3 * flops / peaks.fp32
    variants = [v for v in VARIANTS if not v.endswith("bf16") or _bf16_ok(device)]
    losses: dict[str, list[float]] = {v: [] for v in variants}
    fns = {v: _step_fn(v, model, x, r, losses[v]) for v in variants}
    samples = timed_round_robin(fns, s.repeats, synchronizer(device))
    rows = []
    for v in variants:
        ms = 1e3 * min(samples[v])
        rows.append({"variant": v, "measured_ms": ms, "floor_ms": floor_ms,
                     "ratio": ms / floor_ms, "mean_loss": sum(losses[v]) / len(losses[v])})
    return {"settings": vars(s), "machine": machine_info(), "gflop_per_step": flops / 1e9,
            "peak_gflops": peaks.as_dict(), "floor_ms": floor_ms, "rows": rows,
            "target_ratio": TARGET_RATIO}


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available()


def format_report(report: dict) -> str:
    s = report["settings"]
    base = report["rows"][0]["measured_ms"]
    lines = [f"training step, N={s['N']} M={s['M']}, batch {s['batch_size']} x {s['crop']}px, "
             f"{report['machine']['threads']} threads: {report['gflop_per_step']:.2f} GFLOP, "
             f"floor {report['floor_ms']:.1f} ms at {report['peak_gflops']['fp32']:.1f} "
             "GFLOP/s",
             f"{'variant':<22}{'ms/step':>9}{'x floor':>9}{'vs nchw':>9}{'mean loss':>11}"]
    for row in report["rows"]:
        lines.append(f"{row['variant']:<22}{row['measured_ms']:9.1f}{row['ratio']:8.2f}x"
                     f"{base / row['measured_ms']:8.2f}x{row['mean_loss']:11.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = StepSettings()
    for name in ("N", "M", "batch_size", "crop", "threads", "repeats"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--device", default=d.device)
    args = p.parse_args(argv)
    report = measure(StepSettings(**vars(args)))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
