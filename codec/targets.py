"""Quality targets per image: the rate point of a variable-rate model that meets a PSNR floor
or a bpp budget, found on the cheap amortized encodings, then refined there.

The search bisects the rate grid (codec.variable_rate): PSNR and rate grow with the rate
point, so about log2(grid size) ≈ 8-9 amortized encodings (encoder pass, coding, decoding
back) find the lowest point that reaches a PSNR target, or the highest that stays within a
bpp target. Each is a real encoding: its rate is the file's size, its PSNR that of the
decoded pixels. Iterative inference (SGA) then runs once, at that point. SGA lowers the RD
loss, which usually raises PSNR at about the same rate; if the refined stream misses a
target that the amortized one met, the amortized stream is kept, so a reachable target is
never missed. A target the model cannot reach is coded at the nearest end of its range and
flagged (`EncodeResult.target_met` is False), never missed silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from codec.errors import ModelError
from codec.images import PreparedImage
from codec.inference import InferenceConfig

if TYPE_CHECKING:
    from codec.api import Codec, EncodeResult

TargetKind = Literal["psnr", "bpp"]
_AMORTIZED = InferenceConfig(method="amortized")


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("psnr", "bpp"):
            raise ValueError(f"unknown target {self.kind!r}: psnr or bpp")
        if not self.value > 0:
            raise ValueError(f"target {self.kind} must be > 0, not {self.value}")

    def met(self, result: EncodeResult) -> bool:
        return result.psnr >= self.value if self.kind == "psnr" else result.bpp <= self.value

    def describe(self) -> str:
        return f"PSNR ≥ {self.value:g} dB" if self.kind == "psnr" else f"≤ {self.value:g} bpp"


def _first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The smallest i in [lo, hi] with pred(i), for pred monotone (False ... True); None if
    there is none."""
    if not pred(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def search_rate(codec: Codec, image: PreparedImage, target: Target
                ) -> tuple[int, EncodeResult, bool]:
    """(rate point, its amortized encoding, whether it meets the target)."""
    lm = codec.lm
    if lm.variable is None:
        raise ModelError(f"a {target.kind} target needs a variable-rate model; "
                         f"{lm.entry.id} is fixed-rate (see `sgarc models`)")
    step = lm.entry.rate_step  # the search runs over the encodable points k * step
    top = lm.variable.max_rate_index // step
    tried: dict[int, EncodeResult] = {}

    def amortized(k: int) -> EncodeResult:
        if k not in tried:
            tried[k] = codec.at_rate(k * step).encode(image, _AMORTIZED)
        return tried[k]

    if target.kind == "psnr":  # lowest point whose PSNR reaches the target
        k = _first_true(lambda k: target.met(amortized(k)), 0, top)
        if k is None:
            return top * step, amortized(top), False
    else:  # highest point within the budget: one below the first that exceeds it
        over = _first_true(lambda k: not target.met(amortized(k)), 0, top)
        if over == 0:
            return 0, amortized(0), False
        k = top if over is None else over - 1
    return k * step, amortized(k), True


def encode_to_target(codec: Codec, image: PreparedImage, target: Target,
                     config: InferenceConfig, progress: Callable[[int], None] | None = None
                     ) -> EncodeResult:
    """Encode `image` at the rate point that meets `target`, refined with `config` there.
    Seconds count the search too."""
    t0 = time.perf_counter()
    rate, start, reachable = search_rate(codec, image, target)
    result = start
    if config.method != "amortized" and config.iterations > 0:
        refined = codec.at_rate(rate).encode(image, config, progress)
        # if SGA traded the target away, the amortized stream meets it
        result = refined if target.met(refined) or not target.met(start) else start
    elif progress is not None and config.iterations:
        progress(config.iterations)
    return replace(result, target=target.kind, target_value=target.value,
                   target_met=target.met(result) and reachable,
                   seconds=time.perf_counter() - t0)
