"""Inference: from an image to integer latents (k = y_hat - mu, z_hat).

* `amortized`: one pass of the encoder networks, then rounding (paper Eq. 1).
* `sga`: hybrid amortized-iterative inference with Stochastic Gumbel Annealing (paper 3.1,
  3.2, S3): Adam on the continuous proxies (y, z), initialized by the encoder, minimizing
  the expected RD loss under tempered stochastic rounding, tau(t) = min(tau0,
  tau0 * exp(-c (t - t0))). Both y and z are refined.
* Ablations A1-A4 of the paper: `map` (rounding ignored), `ste` (straight-through rounding),
  `uniform-noise` (Eq. 3 at compression time), `deterministic-annealing` (expectation
  pushed inside the loss).

Every iterative method evaluates the *true* RD loss of the hard-rounded latents as it goes
and returns the best it saw; the amortized start is the first candidate, so the result is
never worse than amortized inference. The RD loss per image is
bits / (original pixels) + lmbda * 255^2 * MSE over the original pixels only (padding
excluded). Images in a batch share a padded size; the loss is a sum of per-image terms and
Adam is elementwise, so batching changes nothing but speed.

Lattice: y_hat = mu(z_hat) + k with integer k (see codec.model), so the methods round
y - mu; z_hat is rounded to integers.

Coded grid (codec.bitstream.latent_grids): a stream codes k only on the y positions of the
16-pixel blocks that hold image pixels plus a margin of 0 or 1 ("tight", "tight+1"); beyond,
k = 0 (y_hat = mu, no bits). Every method keeps k = 0 there (a mask on k and on the rate),
and each image gets the margin whose amortized RD loss is lower (`_choose_layouts`): margin
0 codes the least, but where the image ends on a block edge its last pixels are synthesized
partly from the next latents, which margin 1 then codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from codec.bitstream import TIGHT_MARGINS, latent_grids
from codec.frozen import LATENT_LIMIT
from codec.model import MeanScaleHyperprior
from codec.tiling import Pixels, Sizes, analysis, batch_rows, halo_blocks, masked_sse, region_sse

METHODS = ("amortized", "sga", "map", "ste", "uniform-noise", "deterministic-annealing")
SCHEDULES = ("paper", "scaled")
PAPER_ITERATIONS = 2000  # the budget the paper's t0 and c were chosen for
_DEFAULT_LR = {"ste": 1e-4}  # paper S3: STE needed a tiny learning rate
# The layouts encoders choose from, by name, for fingerprints (pipeline.settings): "tight"
# (TIGHT_MARGINS per image) since 2026-12-06, "replicate" before.
LAYOUT = "tight"


@dataclass
class InferenceConfig:
    """How to infer latents. The defaults are the product's (what ``sgarc encode``, job
    specs and the pipeline use): 1000 iterations of the scaled schedule reached 98% of the
    paper's 2000-iteration gain on val crops at half its cost (docs/performance.md).
    :data:`PAPER` holds the paper's own settings, for reproducing its figures."""

    method: str = "sga"
    iterations: int = 1000
    lr: float | None = None  # None: 5e-3 (1e-4 for ste), the paper's; 1e-2 when "scaled"
    tau0: float = 0.5
    c: float = 1e-3
    t0: int = 700
    eval_every: int = 1  # how often the true (hard-rounded) loss is evaluated
    seed: int = 0
    # "paper": tau(t) as above, t0 and c fixed whatever the budget. "scaled": the same curve
    # stretched onto `iterations` (t0 * T / 2000, c * 2000 / T), so a short run still anneals
    # down to hard rounding, with twice the paper's step size (lr 1e-2 unless set): tuned
    # for budgets of 250-1000 iterations (docs/performance.md).
    schedule: str = "scaled"
    # Per-image early stopping: an image whose best true RD loss improved by less than
    # `min_improvement` (relative) over the last `patience` iterations stops; 0 = off.
    patience: int = 0
    min_improvement: float = 1e-4
    snapshots: tuple[int, ...] = ()  # iterations at which to keep the best latents so far

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.iterations < 0 or self.eval_every < 1:
            raise ValueError("iterations must be >= 0 and eval_every >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        if self.patience < 0 or self.min_improvement < 0:
            raise ValueError("patience and min_improvement must be >= 0")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return _DEFAULT_LR.get(self.method, 1e-2 if self.schedule == "scaled" else 5e-3)

    def tau(self, t: int) -> float:
        t0, c = self.t0, self.c
        if self.schedule == "scaled" and self.iterations:
            stretch = self.iterations / PAPER_ITERATIONS
            t0, c = t0 * stretch, c / stretch
        return min(self.tau0, self.tau0 * math.exp(-c * (t - t0)))


# The paper's settings: 2000 iterations of tau(t) with its fixed t0 and c, lr 5e-3.
PAPER = InferenceConfig(iterations=PAPER_ITERATIONS, schedule="paper")


@dataclass
class Latents:
    # int16, clamped to what the coder codes (|v| <= LATENT_LIMIT = 2^15 - 1): a quarter of
    # int64's bytes, and the stream is the same (codec.api clamps before coding anyway)
    k: torch.Tensor  # int16 (B, M, H, W): y_hat - mu, 0 outside each image's coded grid
    z_hat: torch.Tensor  # int16 (B, N, h, w)
    loss: torch.Tensor  # (B,) true RD loss of these latents under the float model
    start_loss: torch.Tensor  # (B,) true RD loss of the amortized start
    start_terms: dict[str, torch.Tensor]  # amortized bpp (estimated) and mse, per image
    history: list[dict] = field(default_factory=list)  # per evaluation: t, true, relaxed
    iterations: list[int] = field(default_factory=list)  # per image, fewer if stopped early
    # per requested snapshot iteration: (k, z_hat, loss) of the best latents up to then
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    layouts: list[str] = field(default_factory=list)  # per image: the header's pad_mode


def coded_mask(y_shape: torch.Size, sizes: Sizes, layouts: list[str],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, H, W) float mask of the y positions each image's stream codes (its layout's
    grid, codec.bitstream.latent_grids): 1 there, 0 where k = 0 goes uncoded."""
    mask = torch.zeros(len(sizes), 1, *y_shape[-2:], device=device)
    for i, ((h, w), layout) in enumerate(zip(sizes, layouts, strict=True)):
        rows, cols = latent_grids(w, h, layout)[1]
        mask[i, :, :rows, :cols] = 1.0
    return mask


def rd_terms(model: MeanScaleHyperprior, x: torch.Tensor, sizes: Sizes,
             y_hat: torch.Tensor, z_hat: torch.Tensor, lmbda: float, clamp: bool = False,
             mu: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image RD loss, estimated bpp and MSE over each image's own pixels (`sizes`, the
    padding excluded); x in [0, 1] or 8-bit (codec.tiling.to_unit). `mask` (`coded_mask`):
    only those y positions cost bits (None: all)."""
    y_lik, z_lik = model.likelihoods(y_hat, z_hat, mu, sigma)
    pixels = torch.tensor([float(h * w) for h, w in sizes], device=y_hat.device)
    y_bits = -torch.log2(y_lik)
    if mask is not None:
        y_bits = y_bits * mask
    bits = y_bits.sum(dim=(1, 2, 3)) - torch.log2(z_lik).sum(dim=(1, 2, 3))
    mse = masked_sse(model.g_s, y_hat, x, sizes, clamp) / (3.0 * pixels)  # tiled if large
    bpp = bits / pixels
    return {"loss": bpp + lmbda * 255.0**2 * mse, "bpp": bpp, "mse": mse, "bits": bits}


# ------------------------------------------------------------------ rounding relaxations


def _rounding_logits(v: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(v) and the logits of q_tau(round down / up | v), psi = atanh (paper Eq. 4)."""
    floor = torch.floor(v).detach()
    frac = v - floor
    eps = 1e-5
    down = -torch.atanh(frac.clamp(0.0, 1.0 - eps)) / tau
    up = -torch.atanh((1.0 - frac).clamp(0.0, 1.0 - eps)) / tau
    return floor, torch.stack([down, up], dim=-1)


def noise(shape: tuple[int, ...], generators: list[torch.Generator] | torch.Generator | None,
          device) -> torch.Tensor:
    """U(0, 1) noise; with one generator per image (batch row), each image draws its own
    stream, so its noise (and result) does not depend on which images share its batch."""
    if isinstance(generators, list):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device)
                            for g in generators])
    return torch.rand(shape, generator=generators, device=device)


def sga_round(v: torch.Tensor, tau: float,
              generator: list[torch.Generator] | torch.Generator | None = None
              ) -> torch.Tensor:
    """Gumbel-softmax sample of the stochastic rounding of v, at temperature tau."""
    floor, logits = _rounding_logits(v, tau)
    u = noise(logits.shape, generator, v.device).clamp_(1e-10, 1.0)
    gumbel = -torch.log(-torch.log(u))
    w = torch.softmax((logits + gumbel) / tau, dim=-1)
    return floor + w[..., 1]


def expected_round(v: torch.Tensor, tau: float) -> torch.Tensor:
    floor, logits = _rounding_logits(v, tau)
    return floor + torch.softmax(logits, dim=-1)[..., 1]


def ste_round(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _relax(method: str, v: torch.Tensor, tau: float, gen: list[torch.Generator]
           ) -> torch.Tensor:
    if method == "sga":
        return sga_round(v, tau, gen)
    if method == "deterministic-annealing":
        return expected_round(v, tau)
    if method == "ste":
        return ste_round(v)
    if method == "uniform-noise":
        return v + noise(v.shape, gen, v.device) - 0.5
    return v  # map


# ---------------------------------------------------------------------------- inference


@torch.no_grad()
def _hard(model, x, sizes, y, z, lmbda, mask):
    z_hat = torch.round(z)
    mu, sigma = model.hyper_synthesis(z_hat)
    k = torch.round(y - mu).mul_(mask)
    terms = rd_terms(model, x, sizes, mu + k, z_hat, lmbda, clamp=True, mu=mu, sigma=sigma,
                     mask=mask)
    return k, z_hat, terms


RATE_CHANNELS = 8  # latent channels per step of a rate sum (`_position_bits`)


@torch.no_grad()
def _position_bits(model, k, mu, sigma, z_hat) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits of y at each position, summed over channels ((B, 1, H, W); k unmasked) and of z
    per image ((B,)), under the model's likelihoods, in groups of RATE_CHANNELS channels:
    besides k, mu and sigma only one group's likelihoods exist at a time."""
    bits = k.new_zeros(k.shape[0], 1, *k.shape[-2:])
    z_lik = None
    for c in range(0, k.shape[1], RATE_CHANNELS):
        at = (slice(None), slice(c, c + RATE_CHANNELS))
        y_lik, z_lik = model.likelihoods(mu[at] + k[at], z_hat, mu[at], sigma[at])
        bits -= torch.log2(y_lik).sum(dim=1, keepdim=True)
        del y_lik
    return bits, -torch.log2(z_lik).sum(dim=(1, 2, 3))


def infer(model: MeanScaleHyperprior, x: Pixels, sizes: list[tuple[int, int]],
          lmbda: float, cfg: InferenceConfig,
          progress: Callable[[int], None] | None = None,
          layouts: Sequence[str] = tuple(TIGHT_MARGINS)) -> Latents:
    """Integer latents for a batch x (B, 3, Hp, Wp) of one padded size, in [0, 1] or 8-bit
    (then converted to float tile by tile: a large image never exists as float), or
    `codec.tiling.Padded` images (tiles pad their windows: no padded copy); `sizes` are the
    images' own (height, width), the rest is padding. `layouts`: the latent layouts
    (codec.bitstream.PAD_MODES) each image may be coded in; the best per image is kept."""
    with torch.no_grad():
        y0 = analysis(model, x)  # tiled for large images (codec.tiling)
        z0 = model.h_a(y0)
    last = cfg.method == "amortized" or cfg.iterations == 0  # nothing follows: y0 consumed
    chosen, mask, k, z_hat, start = _choose_layouts(model, x, sizes, y0, z0, lmbda, last,
                                                     layouts)
    best = Latents(k, z_hat, start["loss"].clone(), start["loss"].clone(),
                   {"bpp": start["bpp"], "mse": start["mse"]}, layouts=chosen)
    best.history.append({"t": 0, "true": start["loss"].tolist(), "relaxed": None})
    best.iterations = [0] * x.shape[0]
    if cfg.method == "amortized" or cfg.iterations == 0:
        for t in cfg.snapshots:
            _snapshot(best, t)
        return _as_int(best)

    gen = [torch.Generator(device=x.device).manual_seed(cfg.seed) for _ in range(x.shape[0])]
    y = y0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([y, z], lr=cfg.learning_rate)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # only the latents are optimized; the model stays fixed
        p.requires_grad_(False)
    try:
        _refine(model, x, sizes, lmbda, cfg, y, z, mask, opt, gen, best, progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return _as_int(best)


@torch.no_grad()
def _choose_layouts(model, x, sizes, y, z, lmbda, consume: bool, layouts: Sequence[str]):
    """Per image, the layout of `layouts` whose amortized (hard) RD loss is lowest:
    (layouts, coded mask, k, z_hat, RD terms) of that choice. `consume`: y is not needed
    afterwards (k is rounded in its storage, y_hat made in mu's: less memory).

    The layouts' grids are nested (the first codes the fewest positions), and k is the same
    wherever two of them code it, so they differ only on a few border rows and columns of
    latents: in bits (a per-position bit map, made once, masked per layout) and in the
    pixels synthesized from those latents, which `region_sse` measures on a strip of blocks
    around them in both layouts. Only the chosen encoding is synthesized whole. A layout
    that gives every image the grid of one before it is skipped."""
    B = y.shape[0]
    candidates, grids = [], []
    for layout in layouts:
        g = [latent_grids(w, h, layout)[1] for h, w in sizes]
        if g not in grids:
            candidates.append(layout)
            grids.append(g)
    z_hat = torch.round(z)
    mu, sigma = model.hyper_synthesis(z_hat)
    k = y.sub_(mu).round_() if consume else torch.round(y - mu)  # every position, for now
    position_bits, z_bits = _position_bits(model, k, mu, sigma, z_hat)
    del sigma
    pixels = torch.tensor([float(h * w) for h, w in sizes], device=k.device)
    masks = [coded_mask(y.shape, sizes, [layout] * B, y.device) for layout in candidates]
    bits = [(position_bits * m).sum(dim=(1, 2, 3)) + z_bits for m in masks]
    chosen, best = [0] * B, torch.zeros(B, device=k.device)  # loss against the first layout
    for n in range(1, len(candidates)):
        rows, cols = _border(grids[0], grids[n], model.g_s, k.shape[-2:])
        sse = [sum(region_sse(model.g_s, mu + k * m, x, sizes, r, c, clamp=True)
                   for r, c in ((rows, range(k.shape[-1])), (range(rows.start), cols)))
               for m in (masks[0], masks[n])]
        delta = (bits[n] - bits[0]) / pixels + lmbda * 255.0**2 * (sse[1] - sse[0]) / (
            3.0 * pixels)
        for i in (delta < best).nonzero().flatten().tolist():
            chosen[i], best[i] = n, delta[i]
    mask = torch.stack([masks[n][i] for i, n in enumerate(chosen)])
    k.mul_(mask)
    y_hat = mu.add_(k)
    mse = masked_sse(model.g_s, y_hat, x, sizes, clamp=True) / (3.0 * pixels)
    bits_chosen = torch.stack([bits[n][i] for i, n in enumerate(chosen)])
    bpp = bits_chosen / pixels
    terms = {"loss": bpp + lmbda * 255.0**2 * mse, "bpp": bpp, "mse": mse, "bits": bits_chosen}
    return [candidates[n] for n in chosen], mask, k, z_hat, terms


def _border(grid: list[tuple[int, int]], wider: list[tuple[int, int]], g_s,
            shape: tuple[int, int]) -> tuple[range, range]:
    """Latent rows and columns from which on output blocks can differ between two nested
    grids (per image (rows, cols) coded): from the first extra row (column) of any image,
    less g_s's halo (codec.tiling.halo_blocks: a block reads latents up to 2 away), to the
    end of the grid; empty where no image has an extra one. `_choose_layouts` measures all
    columns of those rows and those columns above them."""
    halo = halo_blocks(g_s)

    def band(a: list[int], b: list[int], n: int) -> range:
        starts = [lo for lo, hi in zip(a, b, strict=True) if hi > lo]
        return range(max(min(starts) - halo, 0), n) if starts else range(n, n)

    return (band([r for r, _ in grid], [r for r, _ in wider], shape[0]),
            band([c for _, c in grid], [c for _, c in wider], shape[1]))


def _refine(model, x, sizes, lmbda, cfg, y, z, mask, opt, gen, best, progress) -> None:
    """Adam steps on the relaxed loss; keep the best hard-rounded latents per image.

    With early stopping, images that stop are dropped from the batch (and from Adam's
    state), so the remaining ones run at the cost of a smaller batch.
    """
    B = x.shape[0]
    active = torch.arange(B, device=x.device)  # batch rows still being refined
    reference = best.loss.clone()  # best loss at the last significant improvement
    improved_at = torch.zeros(B, dtype=torch.long, device=x.device)
    snapshots = set(cfg.snapshots)
    t = 0
    for t in range(1, cfg.iterations + 1):
        tau = cfg.tau(t)
        z_t = _relax(cfg.method, z, tau, gen)
        mu, sigma = model.hyper_synthesis(z_t)
        y_t = mu + _relax(cfg.method, y - mu, tau, gen) * mask
        relaxed = rd_terms(model, x, sizes, y_t, z_t, lmbda, mu=mu, sigma=sigma,
                           mask=mask)["loss"]
        opt.zero_grad(set_to_none=True)
        relaxed.sum().backward()
        opt.step()
        if progress is not None:
            progress(1)
        if t % cfg.eval_every == 0 or t == cfg.iterations or t in snapshots:
            k, z_hat, hard = _hard(model, x, sizes, y.detach(), z.detach(), lmbda, mask)
            better = hard["loss"] < best.loss[active]
            rows = active[better]
            best.k[rows], best.z_hat[rows], best.loss[rows] = (
                k[better], z_hat[better], hard["loss"][better])
            true = torch.full((B,), math.nan, device=x.device)
            true[active] = hard["loss"]
            relaxed_all = torch.full((B,), math.nan, device=x.device)
            relaxed_all[active] = relaxed.detach()
            best.history.append({"t": t, "true": true.tolist(), "relaxed": relaxed_all.tolist()})
            if cfg.patience:
                significant = best.loss < reference * (1.0 - cfg.min_improvement)
                reference[significant] = best.loss[significant]
                improved_at[significant] = t
                stop = t - improved_at[active] >= cfg.patience
                for i in active[stop].tolist():
                    best.iterations[i] = t
                if stop.all():
                    if t in snapshots:
                        _snapshot(best, t)
                    break
                if stop.any():
                    gen = [g for g, keep in zip(gen, (~stop).tolist(), strict=True) if keep]
                    active, x, sizes, y, z, opt = _drop(~stop, active, x, sizes, y, z, opt)
                    mask = mask[~stop]
        if t in snapshots:
            _snapshot(best, t)
    for i in active.tolist():
        best.iterations[i] = t
    for s in snapshots:  # budgets past the last iteration run get the final result
        if s > t:
            _snapshot(best, s)
    if progress is not None and t < cfg.iterations:
        progress(cfg.iterations - t)  # stopped early: the bar still ends full


def _snapshot(best: Latents, t: int) -> None:
    best.snapshots[t] = (best.k.clone(), best.z_hat.clone(), best.loss.clone())


def _drop(keep, active, x, sizes, y, z, opt):
    """The batch without the rows that stopped; Adam's moments carried over for the rest."""
    y_new = y.detach()[keep].clone().requires_grad_(True)
    z_new = z.detach()[keep].clone().requires_grad_(True)
    new_opt = torch.optim.Adam([y_new, z_new], lr=opt.param_groups[0]["lr"])
    for old, new in ((y, y_new), (z, z_new)):
        new_opt.state[new] = {name: v[keep].clone() if v.dim() > 0 else v.clone()
                              for name, v in opt.state[old].items()}
    sizes = [s for s, kept in zip(sizes, keep.tolist(), strict=True) if kept]
    return active[keep], batch_rows(x, keep), sizes, y_new, z_new, new_opt


def _as_int(lat: Latents) -> Latents:
    lat.k = _int16(lat.k)
    lat.z_hat = _int16(lat.z_hat)
    lat.snapshots = {t: (_int16(k), _int16(z), loss) for t, (k, z, loss) in lat.snapshots.items()}
    return lat


def _int16(v: torch.Tensor) -> torch.Tensor:
    """Integer-valued float latents as int16, clamped (in place) to |v| <= LATENT_LIMIT:
    the values the coder codes (codec.api clamps the same way; NaN, which int64 made its
    minimum, is -LATENT_LIMIT as it was after that clamp)."""
    if v.dtype == torch.int16:
        return v
    v = v.nan_to_num_(nan=-LATENT_LIMIT, posinf=LATENT_LIMIT, neginf=-LATENT_LIMIT)
    return v.clamp_(-LATENT_LIMIT, LATENT_LIMIT).to(torch.int16)
