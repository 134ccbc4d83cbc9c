"""What every benchmark shares: machine description, timing and the measured peak rates.

One copy, so that `bench/codec_speed.py`, `bench/pipeline_overhead.py` and the suite
(`python -m bench`) time things and describe the machine the same way.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays the table."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def busy_cpus(interval: float = 0.5) -> float | None:
    """CPUs kept busy by other processes (/proc/stat over `interval` s, while this one sleeps)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / max(t1 - t0, 1))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_info(busy: float | None = None) -> dict:
    """The machine in a JSON-able dict: CPU, torch, and the GPU when there is one."""
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "busy_cpus_other_processes_at_start": busy}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": props.name, "count": torch.cuda.device_count(),
                        "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}",
                        "cuda_version": torch.version.cuda}
    return info


# ----------------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None],
          warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def timed_round_robin(fns: dict[str, Callable[[], object]], repeats: int,
                      sync: Callable[[], None]) -> dict[str, list[float]]:
    """Like `timed` for several functions, called in turn in each of `repeats` rounds."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        out[name] += timed(fn, 0, sync, warmup=1)
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name] += timed(fn, 1, sync, warmup=0)
    return out


# ------------------------------------------------------------------------------ peaks


@contextlib.contextmanager
def tf32_matmul() -> Iterator[None]:
    """torch.mm in float32 on CUDA allowed to use TF32 tensor cores, for the duration."""
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 raises
        saved = mm.fp32_precision
        mm.fp32_precision = "tf32"
        try:
            yield
        finally:
            mm.fp32_precision = saved
    else:
        saved = mm.allow_tf32
        mm.allow_tf32 = True
        try:
            yield
        finally:
            mm.allow_tf32 = saved


def conv_precision(device: torch.device) -> str:
    """What float32 convolutions run in on `device`: "tf32" (cuDNN's default) or "fp32"."""
    if device.type != "cuda":
        return "fp32"
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        # "none" inherits from the parent: cudnn.conv -> cudnn -> torch.backends
        for level in (cudnn.conv, cudnn, torch.backends):
            value = getattr(level, "fp32_precision", "none")
            if value != "none":
                return "tf32" if value == "tf32" else "fp32"
        return "fp32"
    return "tf32" if cudnn.allow_tf32 else "fp32"


def gemm_peak(dtype: torch.dtype, device: torch.device, n: int, runs: int) -> float:
    """Best float GEMM rate of torch.mm (n x n) @ (n x n), in FLOP/s."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    c = torch.empty(n, n, dtype=dtype, device=device)
    samples = timed(lambda: torch.mm(a, b, out=c), runs, synchronizer(device), warmup=2)
    return 2.0 * n**3 / min(samples)


def conv_peak(device: torch.device, runs: int, batch: int = 1, channels: int = 128,
              size: int = 64, k: int = 5) -> float:
    """Best rate of one large dense 5x5 convolution (the codec's own kernel path), FLOP/s.

    Counted as a direct convolution (2 * MACs). On some CPUs torch's convolution kernels
    (oneDNN) run well above torch.mm (MKL), which would put a GEMM-only "floor" above
    measured times; the floors use the better of the two.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen, device=device)
    w = torch.randn(channels, channels, k, k, generator=gen, device=device)

    def f():
        with torch.inference_mode():
            return torch.nn.functional.conv2d(x, w, padding=k // 2)

    samples = timed(f, runs, synchronizer(device), warmup=2)
    return 2.0 * batch * channels * channels * k * k * size * size / min(samples)


@dataclass
class Peaks:
    """Measured arithmetic rates (FLOP/s); `fp32` is the one the float32 floors divide by."""

    fp32: float
    fp32_source: str  # which probe `fp32` is, in words
    fp64_cpu: float  # the exact hyper-synthesis runs float64 on the CPU
    probes: dict[str, float] = field(default_factory=dict)  # every probe, FLOP/s
    gemm_n: int = 0
    runs: int = 0
    conv_precision: str = "fp32"  # what the fp32 conv probe (and the codec's convs) ran in

    def as_dict(self) -> dict:
        """GFLOP/s, with the keys bench/codec_speed.py has always written."""
        return {"fp32": self.fp32 / 1e9, "fp32_source": self.fp32_source,
                "fp64": self.fp64_cpu / 1e9, "gemm_n": self.gemm_n, "runs": self.runs,
                "conv_precision": self.conv_precision,
                **{k: v / 1e9 for k, v in self.probes.items()}}

    def describe(self) -> str:
        names = {"fp32_gemm": "fp32 torch.mm", "tf32_gemm": "tf32 torch.mm",
                 "bf16_gemm": "bf16 torch.mm",
                 "fp32_conv5x5": f"5x5 conv ({self.conv_precision})"}
        parts = [f"{names[k]} {v / 1e9:.1f}" for k, v in self.probes.items() if k in names]
        return (f"{', '.join(parts)} GFLOP/s (GEMMs {self.gemm_n}^3) -> floor peak "
                f"{self.fp32 / 1e9:.1f} ({self.fp32_source}); fp64 torch.mm "
                f"{min(self.gemm_n, 2048)}^3 on cpu {self.fp64_cpu / 1e9:.1f} GFLOP/s")


def measure_peaks(device: torch.device, gemm_n: int | None = None, runs: int = 5,
                  choice: str = "max") -> Peaks:
    """The peaks, at the current torch thread count.

    On CUDA float32 convolutions run in TF32 (cuDNN's default, which the codec keeps), so
    the float32 floor there uses the TF32 GEMM rate (or the conv probe if faster); strict
    fp32 and bf16 GEMMs are probed and reported beside it. choice "gemm" ignores the conv.
    """
    cuda = device.type == "cuda"
    n = gemm_n or (8192 if cuda else 2048)
    cpu = torch.device("cpu")
    probes = {"fp32_gemm": gemm_peak(torch.float32, device, n, runs)}
    if cuda:
        with tf32_matmul():
            probes["tf32_gemm"] = gemm_peak(torch.float32, device, n, runs)
        probes["bf16_gemm"] = gemm_peak(torch.bfloat16, device, n, runs)
        # a CUDA-sized conv: batch 16 of 128x128 (one 64x64 image leaves the GPU idle)
        probes["fp32_conv5x5"] = conv_peak(device, runs, batch=16, size=128)
    else:
        probes["fp32_conv5x5"] = conv_peak(device, runs)
    precision = conv_precision(device)
    gemm_key = "tf32_gemm" if precision == "tf32" else "fp32_gemm"
    gemm_words = f"{precision} torch.mm"
    if cuda:
        gemm_words += f", as cuDNN runs fp32 convolutions in {precision}"
    if choice == "gemm" or probes[gemm_key] >= probes["fp32_conv5x5"]:
        fp32, source = probes[gemm_key], gemm_words
    else:
        fp32, source = probes["fp32_conv5x5"], f"5x5 conv in {precision}, above {gemm_words}"
    fp64 = gemm_peak(torch.float64, cpu, min(n, 2048), runs)
    return Peaks(fp32, source, fp64, probes | {"fp64_gemm_cpu": fp64}, n, runs, precision)
