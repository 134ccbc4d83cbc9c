"""Frozen coding state: exact integer hyper-synthesis and the probability tables.

Why this exists (DESIGN.md, decision 1): a learned codec breaks when encoder and decoder
compute the entropy-model parameters with floats that differ in the last bits (CPU vs GPU,
thread counts, kernels) and so pick different probability tables. Here the decoder never
picks a table from a float:

* h_s is re-evaluated at coding time in **exact integer arithmetic**: its weights are frozen
  as fixed-point integers (KW fractional bits, fewer for a layer whose weights are so large
  that KW would break the bound below: `freeze_hyper_synthesis`), activations are
  requantized to KA fractional bits with an integer rounding shift after every layer and
  clamped to a bound, and every accumulator is proven at export to stay below 2^52.
  Convolutions run in float64 on integer values, which is exact whatever the summation
  order, so every device gets the same bits.
* The scale index of each y element is found by integer comparison of the fixed-point scale
  with fixed-point thresholds; the mean mu is the exact fixed-point value.
* All probability tables (one zero-mean discretized Gaussian per scale index, one table per
  z channel) are computed once at export and stored in the model file.
* The fixed-point h_s weights are not stored: they are round(w * 2^KW) of the stored float
  weights, which is exact (a power-of-two scaling and a rounding) on every machine.

Float h_s stays what training and SGA differentiate; the two agree to about 2^-16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codec.entropy_models import SCALE_BOUND, gaussian_pmf
from codec.tiling import input_span, strides

KW = 16  # fractional bits of the frozen h_s weights
KW_MIN = 8  # the fewest a layer may get (weights then within 2^-9 of the float ones)
KA = 16  # fractional bits of h_s activations
ACT_LIMIT = 1 << (KA + 10)  # hidden activations are clamped to |a| <= 1024
LATENT_LIMIT = (1 << 15) - 1  # |k| and |z_hat| bound; escaped values are coded in 16 bits
NUM_SCALES = 128
SCALE_MAX = 256.0
TAIL_SIGMAS = 8.0  # a y table covers k in [-ceil(8 sigma), ceil(8 sigma)], then an escape bin
Z_TAIL_MASS = 1e-9
Z_SUPPORT = 1024
_EXACT_LIMIT = 1 << 52


def scale_table() -> np.ndarray:
    return np.exp(np.linspace(math.log(SCALE_BOUND), math.log(SCALE_MAX), NUM_SCALES))


@dataclass
class HsLayer:
    weight: torch.Tensor  # int64, fixed point with weight_frac fractional bits
    bias: torch.Tensor  # int64, fixed point with weight_frac + in_frac fractional bits
    transposed: bool
    stride: int
    padding: int
    output_padding: int
    in_frac: int  # fractional bits of this layer's input (0 for the integer z_hat)
    relu: bool
    weight_frac: int = KW

    @property
    def shift(self) -> int:
        """Right shift that brings the accumulator back to KA fractional bits."""
        return self.weight_frac + self.in_frac - KA

    @property
    def geometry(self) -> tuple[int, int, int, int, bool]:
        """(kernel, stride, padding, dilation, transposed), for codec.tiling's halo."""
        return self.weight.shape[-1], self.stride, self.padding, 1, self.transposed


@dataclass
class CodingTables:
    """Everything the entropy coder needs; stored in the model file as tensors."""

    hs: list[HsLayer]
    y_thresholds: np.ndarray  # int64 (NUM_SCALES - 1,), fixed point KA
    y_pmfs: list[np.ndarray]  # float64, per scale index, last entry = escape
    z_pmfs: list[np.ndarray]  # float64, per channel, last entry = escape
    z_lo: np.ndarray  # int64 (C,), value of each z table's first symbol

    # -- (de)serialization: flat dict of tensors so torch.load(weights_only=True) reads it
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        out["y.thresholds"] = torch.from_numpy(self.y_thresholds)
        out["y.pmfs"], out["y.offsets"] = _pack(self.y_pmfs)
        out["z.pmfs"], out["z.offsets"] = _pack(self.z_pmfs)
        out["z.lo"] = torch.from_numpy(self.z_lo)
        return out

    @classmethod
    def from_state_dict(cls, s: dict[str, torch.Tensor], h_s: nn.Sequential) -> CodingTables:
        """Tables from a model file; `h_s` is the loaded float hyper-synthesis."""
        return cls(freeze_hyper_synthesis(h_s), s["y.thresholds"].numpy(),
                   _unpack(s["y.pmfs"], s["y.offsets"]), _unpack(s["z.pmfs"], s["z.offsets"]),
                   s["z.lo"].numpy())

    @property
    def y_radius(self) -> np.ndarray:
        return np.array([(len(p) - 2) // 2 for p in self.y_pmfs], np.int64)


def _pack(tables: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = np.cumsum([0] + [len(t) for t in tables]).astype(np.int64)
    return torch.from_numpy(np.concatenate(tables)), torch.from_numpy(offsets)


def _unpack(flat: torch.Tensor, offsets: torch.Tensor) -> list[np.ndarray]:
    f, o = flat.numpy(), offsets.numpy()
    return [f[o[i]:o[i + 1]].copy() for i in range(len(o) - 1)]


# ---------------------------------------------------------------------------- freezing


def _layers_of(h_s: nn.Sequential) -> list[tuple[nn.Module, bool]]:
    mods = list(h_s)
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            out.append((m, relu))
        elif not isinstance(m, nn.ReLU):
            raise TypeError(f"h_s layer {m} has no exact integer form")
    return out


def freeze_hyper_synthesis(h_s: nn.Sequential, z_frac_bits: int = 0) -> list[HsLayer]:
    """Fixed-point copy of h_s, with a proof that no accumulator leaves the exact range.

    Its input is the integer z_hat, or for `z_frac_bits` > 0 (the bits-back model's grid,
    codec.bits_back) z_hat * 2^z_frac_bits: fixed point with that many fractional bits.

    Each layer's weights get KW fractional bits, or the most below KW (down to KW_MIN) that
    keep its accumulator bound under 2^52: a variable-rate model's folded gains can make a
    layer's weights large enough to need it. The choice is integer arithmetic on the stored
    float weights, so every machine makes the same one; layers that fit at KW keep it, so
    the models that always did are frozen to the same bits as before.
    """
    layers, in_frac, bound_in = [], z_frac_bits, LATENT_LIMIT
    for m, relu in _layers_of(h_s):
        w = m.weight.detach().double().cpu()
        b = m.bias.detach().double().cpu()
        transposed = isinstance(m, nn.ConvTranspose2d)
        for kw in range(KW, KW_MIN - 1, -1):
            if max(w.abs().max(), b.abs().max() * 2.0**in_frac) * 2.0**kw >= _EXACT_LIMIT:
                bound_acc = _EXACT_LIMIT  # a single weight is already out of range
                continue
            w_int = torch.round(w * 2.0**kw).to(torch.int64)
            b_int = torch.round(b * 2.0 ** (kw + in_frac)).to(torch.int64)
            l1 = w_int.abs().sum(dim=(0, 2, 3) if transposed else (1, 2, 3))
            # Python integers: the bound itself may not fit in int64
            bound_acc = max(n * bound_in + c for n, c in zip(l1.tolist(), b_int.abs().tolist(),
                                                              strict=True))
            if bound_acc < _EXACT_LIMIT:
                break
        else:
            raise ValueError(f"h_s layer {m}: accumulator bound 2^{math.log2(bound_acc):.1f} "
                             f"exceeds 2^52 even with {KW_MIN} fractional weight bits; exact "
                             "integer evaluation is not possible")
        layer = HsLayer(w_int, b_int, transposed, m.stride[0], m.padding[0],
                        m.output_padding[0] if transposed else 0, in_frac, relu, kw)
        layers.append(layer)
        bound_in = ACT_LIMIT if relu else (bound_acc >> max(layer.shift, 0)) + 1
        in_frac = KA
    return layers


def freeze_y_tables() -> tuple[np.ndarray, list[np.ndarray]]:
    scales = scale_table()
    thresholds = np.floor(np.sqrt(scales[:-1] * scales[1:]) * 2.0**KA).astype(np.int64)
    pmfs = []
    for s in scales:
        radius = max(1, math.ceil(TAIL_SIGMAS * s))
        pmf = gaussian_pmf(float(s), radius)
        pmfs.append(np.append(pmf, max(1.0 - pmf.sum(), 0.0)))
    return thresholds, pmfs


def freeze_z_tables(pmf: np.ndarray, k: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Trim each channel's pmf over integers k to where it has mass, plus an escape bin."""
    tables, lo = [], []
    for p in pmf:
        cdf = np.cumsum(p)
        first = int(np.searchsorted(cdf, Z_TAIL_MASS / 2))
        last = int(np.searchsorted(cdf, cdf[-1] - Z_TAIL_MASS / 2))
        first, last = min(first, len(k) // 2), max(last, len(k) // 2)  # always cover 0
        body = p[first:last + 1]
        tables.append(np.append(body, max(1.0 - body.sum(), 0.0)))
        lo.append(int(k[first]))
    return tables, np.array(lo, np.int64)


@torch.no_grad()
def freeze(model) -> CodingTables:
    """The `update()` step: integer tables from a trained float model (run once, at export)."""
    thresholds, y_pmfs = freeze_y_tables()
    z_pmfs, z_lo = freeze_z_tables(*model.p_z.pmf_table(Z_SUPPORT))
    return CodingTables(freeze_hyper_synthesis(model.h_s), thresholds, y_pmfs, z_pmfs, z_lo)


# ---------------------------------------------------------------- exact hyper-synthesis


HS_TILE = 48  # y positions per tile edge of the exact hyper-synthesis (768 pixels)


def _hs_layer(layer: HsLayer, a: torch.Tensor) -> torch.Tensor:
    """One fixed-point layer over integer activations a, int64. Integer steps run in place,
    so one float64 input, its convolution buffers and one int64 output are alive."""
    x = a.double()
    w = layer.weight.double()
    if layer.transposed:
        acc = F.conv_transpose2d(x, w, None, layer.stride, layer.padding, layer.output_padding)
    else:
        acc = F.conv2d(x, w, None, layer.stride, layer.padding)
    del x
    out = acc.to(torch.int64)
    del acc
    out += layer.bias.view(1, -1, 1, 1)
    shift = layer.shift
    if shift > 0:  # round half up: (acc + 2^(shift-1)) >> shift
        out += 1 << (shift - 1)
        out >>= shift
    elif shift < 0:
        out <<= -shift
    if layer.relu:
        out.clamp_(0, ACT_LIMIT)
    return out


def _hs_window(layers: list[HsLayer], z: torch.Tensor, rows: tuple[int, int],
               cols: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Output [rows) x [cols) (global positions) of the fixed-point layers over z, whose
    full output is `size`. Each layer computes only the span its successor reads (its
    receptive field, clipped at the border, where the window sees the image's own zero
    padding), so small tiles cost little more than the whole image."""
    if not layers:
        return z[..., rows[0]:rows[1], cols[0]:cols[1]]
    *head, last = layers
    _, s, _, _, transposed = last.geometry
    n_in = [n // s if transposed else n * s for n in size]  # this layer's input size
    spans = [input_span([last], lo, hi - 1) for lo, hi in (rows, cols)]
    spans = [(max(lo, 0), min(hi + 1, n)) for (lo, hi), n in zip(spans, n_in, strict=True)]
    if not transposed and (spans[0][0] % s or spans[1][0] % s):
        raise ValueError("a strided convolution's window must start on its stride")
    out = _hs_layer(last, _hs_window(head, z, *spans, n_in))
    # where the window's output starts in the whole output
    origin = [lo * s if transposed else lo // s for lo, _ in spans]
    part = out[..., rows[0] - origin[0]:rows[1] - origin[0],
               cols[0] - origin[1]:cols[1] - origin[1]]
    if part.shape[-2:] != (rows[1] - rows[0], cols[1] - cols[0]):
        raise ValueError("h_s geometry not supported by the windowed exact evaluation")
    return part


@torch.no_grad()
def hyper_synthesis_exact(tables: CodingTables, z_hat: np.ndarray, tile: int | None = None,
                          mean: bool = True, size: tuple[int, int] | None = None
                          ) -> tuple[np.ndarray | None, np.ndarray]:
    """(mu, scale_index) of p(y | z_hat) for integer z_hat (B, C, h, w); bit-exact everywhere.

    Runs on the CPU in float64 over integer values; mu is float64 (B, M, H, W), the scale
    index uint8 (it is < NUM_SCALES) of the same shape. Computed over tiles of `tile` y
    positions (None: HS_TILE; `_hs_window`), so a large image's hidden layers and their
    float64 convolution buffers (im2col: about 10 KB per y position for the last layer,
    i.e. 40 bytes per pixel) never exist at full size. Integer arithmetic is exact, so the
    tiles give the same bits as the whole image. ``mean=False``: the scale index only (mu
    None), for an encoder that needs no mu yet (8 bytes per latent less). ``size``: the
    (rows, columns) of a coded grid smaller than h_s's output (the tight layouts,
    codec.bitstream.latent_grids): only that top-left part is computed and returned.
    """
    z = torch.from_numpy(np.ascontiguousarray(z_hat, dtype=np.int64))
    B, _, h, w = z.shape
    _, up = strides(tables.hs)
    full = (h * up, w * up)
    out = full if size is None else (min(size[0], full[0]), min(size[1], full[1]))
    tile = HS_TILE if tile is None else tile
    if tile < 1:
        raise ValueError(f"tile must be >= 1 (got {tile})")
    mu, index = None, None
    for r0 in range(0, out[0], tile):
        for c0 in range(0, out[1], tile):
            rows, cols = (r0, min(r0 + tile, out[0])), (c0, min(c0 + tile, out[1]))
            sigma_int, mu_int = _hs_window(tables.hs, z, rows, cols, full).chunk(2, dim=1)
            if index is None:
                index = np.empty((B, mu_int.shape[1], *out), np.uint8)
                mu = np.empty(index.shape, np.float64) if mean else None
            at = (..., slice(*rows), slice(*cols))
            if mu is not None:
                mu[at] = mu_int.double().numpy() / 2.0**KA
            index[at] = np.searchsorted(tables.y_thresholds, sigma_int.numpy(), side="right")
    return mu, index
