"""Tiled g_a / g_s: large images in bounded memory, with the same result as the whole image.

Why. A whole-image pass keeps a few full-size activations alive at once: for a 24 MP photo
the last hidden layers of g_s hold 3000x2000xN floats (1.5 GiB per tensor at N=64), and a
CPU decode peaked at 6.6 GiB. Running the transform over tiles bounds the peak to one
tile's activations plus the output, and keeps the working set nearer the caches.

How. The image is cut into a grid of cores; each core is run with a margin (halo) of
context on every side, and only the core of the output is kept. The halo comes from the
receptive field of the layers (`halo_blocks`): an output core depends on input only within
the halo, so a tile computes exactly the values the whole image would. At the image border
the window is clipped rather than padded, so a border tile sees the same implicit zero
padding as the whole image. Tiles start on the transform's stride grid (multiples of 16
pixels for g_a), so every tile's convolutions sample the same positions as the whole image.

    g_s: 4 transposed convs 5x5/2, padding 2, output padding 1; IGDN is per pixel.
         Output o of one layer reads inputs i with 2i - 2 + j = o, j in 0..4, i.e.
         i in [ceil((o - 2) / 2), floor((o + 2) / 2)]. Pixels [16a, 16b) of x_hat thus read
         layer-3 outputs [8a - 1, 8b], layer-2 [4a - 1, 4b + 1], layer-1 [2a - 1, 2b + 1]
         and latents [a - 1, b + 1]: 1 latent before the core, 2 after its last one (b - 1),
         so a halo of 2 latents (32 output pixels).
    g_a: 4 convs 5x5/2, padding 2; GDN is per pixel. Output o reads inputs [2o - 2, 2o + 2],
         so latents [a, b) read pixels [16a - 30, 16b + 14]: 30 pixels of halo, rounded up to
         32 to stay on the 16-pixel stride grid.

Exactness. Tiled and whole-image results are the same real numbers; in floating point they
can differ only where a convolution kernel sums in a different order for a different tile
shape (oneDNN / cuDNN pick algorithms by shape). On the CPU the tests find them equal to
float rounding (and 8-bit pixels equal or within one level); the bitstream never depends on
g_s (coding parameters come from the exact integer hyper-synthesis, codec.frozen).

`masked_sse_tiled` is the differentiable version for SGA: each tile runs under activation
checkpointing, so backward keeps only the tile inputs and recomputes one tile at a time.

No Ray, no storage: plain torch over tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from codec.gdn import GDN
from codec.model import Y_STRIDE, MeanScaleHyperprior

# Images with more pixels than this (height x width x batch of the padded input or output)
# are tiled. Below it the whole image runs at once, exactly as before tiling existed.
MIN_TILED_PIXELS = 4_000_000
SYNTHESIS_TILE = 64  # latents per core edge: 1024x1024 output pixels (1 MP) per tile
ANALYSIS_TILE = 1024  # pixels per core edge (a multiple of 64): 1 MP of input per tile

_POINTWISE = (GDN, nn.ReLU, nn.Identity)


# ------------------------------------------------------------------------ receptive field


def _square(v: int | tuple[int, ...]) -> int:
    """The one value of a square kernel / stride / padding (tiling assumes both axes alike)."""
    if isinstance(v, int):
        return v
    if len(set(v)) != 1:
        raise ValueError(f"tiling needs square kernels, strides and padding, not {v}")
    return v[0]


def _geometry(layer) -> tuple[int, int, int, int, bool] | None:
    """(kernel, stride, padding, dilation, transposed) of a convolution; None for a per-pixel
    layer. A layer that is neither a torch conv nor per pixel (codec.frozen's exact h_s
    layers) says its own through a `geometry` attribute."""
    if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
        return (_square(layer.kernel_size), _square(layer.stride), _square(layer.padding),
                _square(layer.dilation), isinstance(layer, nn.ConvTranspose2d))
    if isinstance(layer, _POINTWISE):
        return None
    geometry = getattr(layer, "geometry", None)
    if geometry is None:
        raise TypeError(f"unknown receptive field of {type(layer).__name__}; "
                        "add it to codec.tiling before tiling this transform")
    return geometry


def strides(layers: Iterable) -> tuple[int, int]:
    """(down, up): input block and output block of the transform (g_a: 16, 1; g_s: 1, 16)."""
    down = up = 1
    for layer in layers:
        g = _geometry(layer)
        if g is not None and g[4]:
            up *= g[1]
        elif g is not None:
            down *= g[1]
    return down, up


def input_span(layers: Iterable, lo: int, hi: int) -> tuple[int, int]:
    """Input positions [lo', hi'] (inclusive, one axis) that outputs [lo, hi] depend on."""
    for layer in reversed(list(layers)):
        g = _geometry(layer)
        if g is None:
            continue
        k, s, p, d, transposed = g
        if transposed:  # out[i*s - p + j*d] += w[j] in[i]
            lo, hi = math.ceil((lo + p - d * (k - 1)) / s), math.floor((hi + p) / s)
        else:  # out[o] = sum_j w[j] in[o*s - p + j*d]
            lo, hi = lo * s - p, hi * s - p + d * (k - 1)
    return lo, hi


def halo_blocks(layers: Iterable) -> int:
    """Halo in input blocks so that every output block of a core is exact (g_s: 2, g_a: 2).

    The transform is shift-equivariant by whole blocks, so one block far from the border
    says it all: the halo is how far its input span reaches past the block's own input.
    """
    down, up = strides(layers)
    at = 1000  # any block index away from the border
    lo, hi = input_span(layers, at * up, at * up + up - 1)
    reach = max(at * down - lo, hi - (at * down + down - 1), 0)
    return -(-reach // down)


# ---------------------------------------------------------------------------------- tiles


def _spans(n: int, tile: int, halo: int, cores: range | None = None
           ) -> Iterator[tuple[int, int, int, int]]:
    """(core start, core end, window start, window end) along one axis of n blocks, in
    blocks: cores of `tile` blocks over `cores` (None: all n)."""
    cores = range(n) if cores is None else cores
    for a in range(cores.start, cores.stop, tile):
        b = min(a + tile, cores.stop)
        yield a, b, max(a - halo, 0), min(b + halo, n)


Writer = Callable[[torch.Tensor, slice, slice], None]


def for_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: Pixels, tile: int,
               halo: int, down: int, up: int, write: Writer) -> None:
    """Run fn on overlapping windows of x (tile and halo in blocks of `down` input pixels)
    and hand each output core, with its place in the whole output, to `write`."""
    if tile < 1 or halo < 0:
        raise ValueError(f"tile must be >= 1 and halo >= 0 (got {tile}, {halo})")
    H, W = x.shape[-2:]
    for r0, r1, wr0, wr1 in _spans(-(-H // down), tile, halo):
        for c0, c1, wc0, wc1 in _spans(-(-W // down), tile, halo):
            part = fn(window(x, slice(wr0 * down, min(wr1 * down, H)),
                             slice(wc0 * down, min(wc1 * down, W))))
            core = part[..., (r0 - wr0) * up:(r1 - wr0) * up, (c0 - wc0) * up:(c1 - wc0) * up]
            write(core, slice(r0 * up, r0 * up + core.shape[-2]),
                  slice(c0 * up, c0 * up + core.shape[-1]))


def _into(out: list[torch.Tensor], shape: tuple[int, ...]) -> Writer:
    """A writer into a float output allocated at the first tile (its channels are known then)."""
    def write(core: torch.Tensor, rows: slice, cols: slice) -> None:
        if not out:
            out.append(core.new_empty((*core.shape[:2], *shape)))
        out[0][..., rows, cols] = core
    return write


@torch.no_grad()
def synthesize_tiled(g_s: nn.Sequential, y_hat: torch.Tensor, tile: int | None = None,
                     halo: int | None = None) -> torch.Tensor:
    """g_s(y_hat) over tiles of `tile` latents (None: SYNTHESIS_TILE) with `halo` latents of
    context (None: from the receptive field, 2 for g_s); peak memory is one tile's
    activations plus x_hat."""
    down, up = strides(g_s)
    tile = SYNTHESIS_TILE if tile is None else tile
    halo = halo_blocks(g_s) if halo is None else halo
    H, W = y_hat.shape[-2:]
    out: list[torch.Tensor] = []
    for_tiles(g_s, y_hat, tile, halo, down, up, _into(out, (-(-H // down) * up,
                                                              -(-W // down) * up)))
    return out[0]


@torch.no_grad()
def analyze_tiled(g_a: nn.Sequential, x: Pixels, tile: int | None = None,
                  halo: int | None = None) -> torch.Tensor:
    """g_a(x) over tiles of `tile` pixels (None: ANALYSIS_TILE) with `halo` pixels of context
    (None: from the receptive field, 32 for g_a). Both must be multiples of the stride (16)
    so that every tile's convolutions sample the same grid as the whole image. x may be
    8-bit (`to_unit`, per tile)."""
    down, up = strides(g_a)
    tile = ANALYSIS_TILE if tile is None else tile
    halo = down * halo_blocks(g_a) if halo is None else halo
    if tile % down or halo % down:
        raise ValueError(f"tile and halo must be multiples of {down} pixels "
                         f"(got {tile}, {halo})")
    H, W = x.shape[-2:]
    out: list[torch.Tensor] = []
    for_tiles(lambda part: g_a(to_unit(part)), x, tile // down, halo // down, down, up,
               _into(out, (-(-H // down) * up, -(-W // down) * up)))
    return out[0]


def _to_uint8(x_hat: torch.Tensor) -> torch.Tensor:
    return torch.round(x_hat.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


@torch.inference_mode()
def synthesize_pixels(g_s: nn.Sequential, y_hat: torch.Tensor, height: int, width: int,
                      tile: int | None = None, halo: int | None = None) -> np.ndarray:
    """8-bit pixels (B, height, width, 3) of g_s(y_hat), cropped: what a decoder returns.

    Each tile is rounded to uint8 and copied to the (CPU) output as soon as it is done, so
    no full-size float image ever exists. tile None: tiled when the image is larger than
    MIN_TILED_PIXELS, else one pass over the whole image.
    """
    B = y_hat.shape[0]
    out = np.empty((B, height, width, 3), np.uint8)
    if tile is None:
        tile = SYNTHESIS_TILE if is_large(height * width) else max(*y_hat.shape[-2:], 1)

    def write(core: torch.Tensor, rows: slice, cols: slice) -> None:
        rows = slice(rows.start, min(rows.stop, height))
        cols = slice(cols.start, min(cols.stop, width))
        if rows.start < rows.stop and cols.start < cols.stop:
            part = core[..., :rows.stop - rows.start, :cols.stop - cols.start]
            out[:, rows, cols] = _to_uint8(part).permute(0, 2, 3, 1).cpu().numpy()

    down, up = strides(g_s)
    for_tiles(g_s, y_hat, tile, halo_blocks(g_s) if halo is None else halo, down, up, write)
    return out


# ------------------------------------------------------------------ 8-bit input, unpadded


class Padded:
    """8-bit (H, W, 3) images as the (B, 3, Hp, Wp) uint8 batch that `images.padded_batch`
    makes (each padded at the bottom/right to the next multiple by edge replication),
    without making it: a tile reads its window (`window`), padded where it crosses the
    image's border, so a large image is never copied whole (3 bytes per pixel).

    A window has the values and the layout (channels last) of the same slice of the
    padded batch, so everything computed from it is the same. Has `shape`, `dtype` and
    `device` like the tensor it stands for; `full()` makes that tensor.
    """

    dtype = torch.uint8

    def __init__(self, images: Sequence[np.ndarray], multiple: int,
                 device: torch.device | str = "cpu") -> None:
        if not images:
            raise ValueError("Padded needs at least one image")
        sizes = {(-(-x.shape[0] // multiple) * multiple, -(-x.shape[1] // multiple) * multiple)
                 for x in images}
        if len(sizes) != 1 or any(x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3
                                  for x in images):
            raise ValueError("Padded needs uint8 (H, W, 3) images of one padded size")
        (hp, wp), = sizes
        self.images = list(images)
        self.shape = torch.Size((len(images), 3, hp, wp))
        self.device = torch.device(device)

    def window(self, rows: slice, cols: slice) -> torch.Tensor:
        """uint8 (B, 3, h, w) of the padded batch's [..., rows, cols] (steps of 1)."""
        if len(self.images) == 1 and self.images[0].shape[:2] == self.shape[2:]:
            # nothing to pad: a view of the image, as padded_batch's batch is (strides
            # included: the batch axis has stride 0, and float results follow the layout)
            x = torch.from_numpy(self.images[0][None]).permute(0, 3, 1, 2)
            return x[..., rows, cols].to(self.device)
        r0, r1, _ = rows.indices(self.shape[2])
        c0, c1, _ = cols.indices(self.shape[3])
        out = np.empty((len(self.images), max(r1 - r0, 0), max(c1 - c0, 0), 3), np.uint8)
        for dst, x in zip(out, self.images, strict=True):
            h, w = x.shape[:2]
            if r1 <= h and c1 <= w:
                dst[...] = x[r0:r1, c0:c1]
            else:  # past the border: the last row / column repeated, as padded_batch does
                ri = np.minimum(np.arange(r0, r1), h - 1)
                ci = np.minimum(np.arange(c0, c1), w - 1)
                dst[...] = x[ri[:, None], ci[None, :]]
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(self.device)

    def full(self) -> torch.Tensor:
        """The whole padded batch as a tensor (for a small image, or a device's memory)."""
        return self.window(slice(None), slice(None))

    def rows(self, keep: torch.Tensor) -> Padded:
        """The batch of the images where the boolean `keep` is True."""
        out = object.__new__(Padded)
        out.images = [x for x, k in zip(self.images, keep.tolist(), strict=True) if k]
        out.shape = torch.Size((len(out.images), *self.shape[1:]))
        out.device = self.device
        return out


Pixels = torch.Tensor | Padded  # what the encoder's functions take as x


def window(x: Pixels, rows: slice, cols: slice) -> torch.Tensor:
    """x[..., rows, cols]: a view of a tensor, a padded window of `Padded` images."""
    return x.window(rows, cols) if isinstance(x, Padded) else x[..., rows, cols]


def whole(x: Pixels) -> torch.Tensor:
    """x as one tensor (`Padded` images padded: only for images below the tiling size)."""
    return x.full() if isinstance(x, Padded) else x


def batch_rows(x: Pixels, keep: torch.Tensor) -> Pixels:
    """The images of the batch x where the boolean `keep` is True."""
    return x.rows(keep) if isinstance(x, Padded) else x[keep]


# ---------------------------------------------------------------- differentiable distortion


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1]: 8-bit x / 255 as float32, anything else as it is.

    Encoders hand the image over as 8 bits and every tile converts its own window, so a
    large image never exists as float (12 bytes per pixel against 3); elementwise, so a
    tile's values are those of converting the whole image.
    """
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


Sizes = Sequence[tuple[int, int]]  # per image of a batch: (height, width) of its own pixels


def _window_mask(sizes: Sizes, row0: int, col0: int, shape: tuple[int, int],
                 like: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) mask of the window at (row0, col0): 1 on each image's own pixels, 0 on
    its padding. Made per tile, so no full-size mask exists."""
    mask = like.new_zeros(len(sizes), 1, *shape)
    for i, (h, w) in enumerate(sizes):
        mask[i, :, :max(h - row0, 0), :max(w - col0, 0)] = 1.0
    return mask


def _tile_sse(g_s: nn.Sequential, y_window: torch.Tensor, x: Pixels, rows: slice,
              cols: slice, sizes: Sizes, r: int, c: int, clamp: bool) -> torch.Tensor:
    """Masked SSE per image of one tile: g_s over the window, the core at (r, c) kept,
    against x[..., rows, cols] of the image: a tensor x is that window already (a view),
    `Padded` images are read here (so that a checkpoint keeps no copy of them)."""
    if isinstance(x, Padded):
        x = x.window(rows, cols)
    x_hat = g_s(y_window)[..., r:r + x.shape[-2], c:c + x.shape[-1]]
    if clamp:
        x_hat = x_hat.clamp(0.0, 1.0)
    mask = _window_mask(sizes, rows.start, cols.start, x.shape[-2:], x_hat)
    return (((x_hat - to_unit(x)) ** 2) * mask).sum(dim=(1, 2, 3))


def masked_sse_tiled(g_s: nn.Sequential, y_hat: torch.Tensor, x: Pixels, sizes: Sizes,
                     tile: int | None = None, halo: int | None = None,
                     clamp: bool = False) -> torch.Tensor:
    """Per-image sum over each image's own pixels (`sizes`; padding excluded) of
    (g_s(y_hat) - x)^2, shape (B,), differentiable w.r.t. y_hat (and g_s's parameters) in
    bounded memory.

    Each tile runs under torch.utils.checkpoint (non-reentrant): forward keeps only the
    tile's inputs (views of y_hat and x), backward recomputes one tile's activations at a
    time. Value and gradient equal the untiled computation up to float rounding, because
    each core is exact (module docstring) and every output pixel lies in exactly one core.
    x is (B, 3, 16h, 16w) for y_hat (B, M, h, w), in [0, 1] or 8-bit (`to_unit`, per
    tile). clamp: x_hat clamped to [0, 1] first, as the true (hard) RD loss does. tile
    None: SYNTHESIS_TILE latents.
    """
    H, W = y_hat.shape[-2:]
    return region_sse(g_s, y_hat, x, sizes, range(H), range(W), tile, halo, clamp)


def region_sse(g_s: nn.Sequential, y_hat: torch.Tensor, x: Pixels, sizes: Sizes,
               rows: range, cols: range, tile: int | None = None, halo: int | None = None,
               clamp: bool = False) -> torch.Tensor:
    """`masked_sse_tiled` over the output blocks `rows` x `cols` only (in latent positions,
    one block of 16x16 pixels each): g_s runs on those cores and their halo, so the sum is
    that of the same pixels of the whole image's synthesis. What changing a few latents
    costs (their blocks plus the halo), without synthesizing the rest."""
    _, up = strides(g_s)
    tile = SYNTHESIS_TILE if tile is None else tile
    halo = halo_blocks(g_s) if halo is None else halo
    H, W = y_hat.shape[-2:]
    if x.shape[-2:] != (H * up, W * up) or len(sizes) != y_hat.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} must be {up}x the size of y_hat "
                         f"{tuple(y_hat.shape)}, with one size per image (got {len(sizes)})")
    grad = torch.is_grad_enabled() and (y_hat.requires_grad
                                        or any(p.requires_grad for p in g_s.parameters()))
    total = y_hat.new_zeros(y_hat.shape[0])
    for r0, r1, wr0, wr1 in _spans(H, tile, halo, rows):
        for c0, c1, wc0, wc1 in _spans(W, tile, halo, cols):
            prows, pcols = slice(r0 * up, r1 * up), slice(c0 * up, c1 * up)
            x_part = x if isinstance(x, Padded) else x[..., prows, pcols]
            args = (g_s, y_hat[..., wr0:wr1, wc0:wc1], x_part, prows, pcols, sizes,
                    (r0 - wr0) * up, (c0 - wc0) * up, clamp)
            if grad:  # g_s draws no random numbers: no RNG state to keep for the recompute
                sse = checkpoint(_tile_sse, *args, use_reentrant=False,
                                 preserve_rng_state=False)
            else:
                sse = _tile_sse(*args)
            total = total + sse
    return total


# ---------------------------------------------------- whole image or tiles, by image size


def is_large(pixels: int) -> bool:
    """Whether an image of this many pixels is worth tiling. Per image, not per batch: an
    image's result must not depend on which images share its batch."""
    return pixels > MIN_TILED_PIXELS


def analysis(model: MeanScaleHyperprior, x: Pixels) -> torch.Tensor:
    """y = g_a(x) (x in [0, 1] or 8-bit): tiled for large inputs (then without gradients),
    else one pass."""
    if is_large(x.shape[-2] * x.shape[-1]):
        return analyze_tiled(model.g_a, x)
    return model.g_a(to_unit(whole(x)))


def synthesis(model: MeanScaleHyperprior, y_hat: torch.Tensor) -> torch.Tensor:
    """x_hat = g_s(y_hat): tiled for large outputs (then without gradients), else one pass."""
    if is_large(y_hat.shape[-2] * y_hat.shape[-1] * Y_STRIDE**2):
        return synthesize_tiled(model.g_s, y_hat)
    return model.g_s(y_hat)


def masked_sse(g_s: nn.Sequential, y_hat: torch.Tensor, x: Pixels, sizes: Sizes,
               clamp: bool = False) -> torch.Tensor:
    """Per-image SSE of g_s(y_hat) against x over each image's own pixels: tiled with
    checkpointing for large images (bounded memory, one extra g_s forward in backward),
    else one pass."""
    if is_large(x.shape[-2] * x.shape[-1]):
        return masked_sse_tiled(g_s, y_hat, x, sizes, clamp=clamp)
    # the whole image as one tile
    return _tile_sse(g_s, y_hat, x, slice(0, x.shape[-2]), slice(0, x.shape[-1]), sizes, 0, 0,
                     clamp)
