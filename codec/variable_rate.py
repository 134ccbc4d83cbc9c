"""One model, any rate: a Mean-Scale Hyperprior with gain units (Cui et al. 2021).

"Asymmetric Gained Deep Image Compression With Continuous Rate Adaptation" (CVPR 2021):
per-channel gain vectors, one per trained λ, scale the latents before quantization and
their inverses scale them back after; interpolating the vectors exponentially between two
trained λ gives every rate in between from the same transforms. We chose it over
conditional convolutions or λ-conditioned networks because it adds only 2(N + M) numbers per
rate point, keeps the transforms (and so the decoder's speed and its exact integer
hyper-synthesis) exactly those of the fixed-rate model, and works as a fine-tune of a
trained fixed-rate model (each rate point starts as that model with a quantization step
1/gain).

For rate point r (gains taken absolute, as in the paper):

    y' = gain_r ⊙ g_a(x)                        coded latent (the lattice is mu' + k)
    z' = hyper_gain_r ⊙ h_a(g_a(x))             coded hyperlatent
    (mu', sigma') = gain_r ⊙ h_s(hyper_inverse_gain_r ⊙ ẑ')
    x̂ = g_s(inverse_gain_r ⊙ ŷ')

The hyper-synthesis predicts the un-gained y and the gain scales its prediction, so the
entropy model matches the gained latents at every rate point (equivalently: a per-channel
quantization step 1/gain). Every term is a per-channel product, so a rate point is
*materialized* by folding its gains into the weights of a plain `MeanScaleHyperprior`
(`materialize`): inference, SGA, tiling, fast synthesis and the exact coding path run on it
unchanged.

Exactness (DESIGN.md, decision 1). The gains that reach the coding parameters (gain_r and
hyper_inverse_gain_r, folded into h_s) must be the same bits on every machine. Interpolating
them needs exp/log, which differ between math libraries, so the continuous rate is a grid:
RATE_STEPS points per interval between trained λ, numbered 0 .. (R - 1) * RATE_STEPS, and the
gains of every grid point are computed once at export and stored in the model file
(`GainTables`). The stream header carries the grid index; folding a stored float32 gain into
a float32 weight is one IEEE multiplication, the same everywhere.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from codec.entropy_models import gaussian_likelihood
from codec.inference import ste_round
from codec.model import MeanScaleHyperprior, with_uniform_noise

RATE_STEPS = 32  # grid points per interval between trained λ (λ ratio 2: 2.2% per step)
GAIN_NAMES = ("gain", "inverse_gain", "hyper_gain", "hyper_inverse_gain")
# The sides of a fine-tune on rounded latents (`GainedMeanScaleHyperprior._hard_forward`,
# TrainConfig.fine_tune) and the parameters each trains (names, or prefixes ending in ".").
FINE_TUNE_PARTS = {
    "synthesis": ("base.g_s.", "inverse_gain"),
    "analysis": ("base.g_a.", "base.h_a.", "hyper_gain"),
}


# The trained λ points: 0.0009 · 2^k, k = 0..8 (about 0.1 to beyond 2 bpp on photos).
DEFAULT_LMBDAS = tuple(round(0.0009 * 2.0**k, 6) for k in range(9))


def check_lmbdas(lmbdas: tuple[float, ...]) -> None:
    if len(lmbdas) < 2 or any(b <= a for a, b in itertools.pairwise(lmbdas)):
        raise ValueError(f"λ points must be at least two increasing values, not {lmbdas}")


class GainedMeanScaleHyperprior(nn.Module):
    """The base transforms plus one (gain, inverse gain, hyper gain, hyper inverse gain) per λ."""

    def __init__(self, N: int = 64, M: int = 96,
                 lmbdas: tuple[float, ...] | list[float] = DEFAULT_LMBDAS) -> None:
        super().__init__()
        lmbdas = tuple(float(v) for v in lmbdas)
        check_lmbdas(lmbdas)
        self.N, self.M, self.lmbdas = N, M, lmbdas
        self.base = MeanScaleHyperprior(N, M)
        R = len(lmbdas)
        self.gain = nn.Parameter(torch.ones(R, M))
        self.inverse_gain = nn.Parameter(torch.ones(R, M))
        self.hyper_gain = nn.Parameter(torch.ones(R, N))
        self.hyper_inverse_gain = nn.Parameter(torch.ones(R, N))

    @property
    def num_rates(self) -> int:
        return len(self.lmbdas)

    def lmbdas_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.lmbdas, device=device)

    def lmbda_at(self, r: torch.Tensor) -> torch.Tensor:
        """λ at rate positions r (B,): trained points (integers), or positions between
        them (floats, grid index / RATE_STEPS), interpolated as `rate_lmbda` does."""
        lmbdas = self.lmbdas_tensor(r.device)
        if not r.is_floating_point():
            return lmbdas[r]
        return _lerp_logs(lmbdas.log()[:, None], r)[:, 0].exp()

    @torch.no_grad()
    def init_from_fixed(self, fixed: MeanScaleHyperprior, lmbda: float) -> None:
        """Start from a trained fixed-rate model at `lmbda`: rate point r then codes with the
        quantization step sqrt(lmbda / λ_r), the high-rate optimum for R + λD (D ∝ step²)."""
        self.base.load_state_dict(fixed.state_dict())
        g = torch.tensor([math.sqrt(v / lmbda) for v in self.lmbdas]).view(-1, 1)
        self.gain.copy_(g.expand_as(self.gain))
        self.inverse_gain.copy_((1.0 / g).expand_as(self.inverse_gain))
        self.hyper_gain.fill_(1.0)
        self.hyper_inverse_gain.fill_(1.0)

    def gains(self, r: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample gains (B, C, 1, 1) at rate positions r (B,): trained points
        (integers), or positions between them (floats: grid index / RATE_STEPS), where the
        gains are the exponential interpolation that `gain_tables` stores, differentiable,
        so training can cover every grid point (TrainConfig.rate_grid)."""
        if not r.is_floating_point():
            return {name: getattr(self, name).abs()[r][:, :, None, None] for name in GAIN_NAMES}
        return {name: _lerp_logs(getattr(self, name).abs().log(), r).exp()[:, :, None, None]
                for name in GAIN_NAMES}

    def forward(self, x: torch.Tensor, r: torch.Tensor, bf16: bool = False,
                hard: str | None = None) -> dict:
        """Training forward at rate point r[i] for image i (uniform-noise relaxation).

        bf16: the transforms' hidden layers run under bfloat16 autocast and their last
        layers in float32 (`_transform`), so y, z, mu, sigma and x_hat keep float32
        precision where rounding and the rate depend on it. hard (a key of
        FINE_TUNE_PARTS): the latents as coding rounds them (`_hard_forward`).
        """
        if hard is not None:
            return self._hard_forward(x, r, bf16, hard)
        g = self.gains(r)
        y, z = self._analysis(x, g, bf16)
        z_tilde, y_tilde = with_uniform_noise(z), with_uniform_noise(y)
        mu, sigma = self._entropy_parameters(z_tilde, g, bf16)
        return {"x_hat": _transform(self.base.g_s, y_tilde * g["inverse_gain"], bf16),
                "likelihoods": {"y": gaussian_likelihood(y_tilde, mu, sigma),
                                "z": self.base.p_z.likelihood(z_tilde)}}

    def _hard_forward(self, x: torch.Tensor, r: torch.Tensor, bf16: bool, side: str) -> dict:
        """The forward on the latents that coding produces: z_hat = round(z) and y_hat =
        mu + round(y - mu) (codec.inference). side "synthesis": gradients reach g_s and
        the inverse gains only, and the rate is that of the rounded latents (constant for
        them). "analysis": they reach the encoder, through straight-through rounding for
        the decoder's input and through the noisy rate (y + u, z + u) for the rate, the
        "mixed" quantization of Minnen & Singh 2020: a straight-through rate has no
        gradient where y rounds to mu, and the encoder's rate grew (docs/results.md)."""
        if side not in FINE_TUNE_PARTS:
            raise ValueError(f"hard forward side {side!r}: expected one of "
                             f"{tuple(FINE_TUNE_PARTS)}")
        g = self.gains(r)
        analysis = side == "analysis"
        with torch.set_grad_enabled(analysis and torch.is_grad_enabled()):
            y, z = self._analysis(x, g, bf16)
            z_hat = ste_round(z)
            mu, sigma = self._entropy_parameters(z_hat, g, bf16)
            y_hat = mu + ste_round(y - mu)
            y_rate, z_rate = ((with_uniform_noise(y), with_uniform_noise(z)) if analysis
                              else (y_hat, z_hat))
            likelihoods = {"y": gaussian_likelihood(y_rate, mu, sigma),
                           "z": self.base.p_z.likelihood(z_rate)}
        return {"x_hat": _transform(self.base.g_s, y_hat * g["inverse_gain"], bf16),
                "likelihoods": likelihoods}

    def _analysis(self, x: torch.Tensor, g: dict[str, torch.Tensor], bf16: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, z) at the gains g: gain * g_a(x) and hyper_gain * h_a(g_a(x))."""
        y = _transform(self.base.g_a, x, bf16)
        z = _transform(self.base.h_a, y, bf16) * g["hyper_gain"]
        return y * g["gain"], z

    def _entropy_parameters(self, z_read: torch.Tensor, g: dict[str, torch.Tensor],
                            bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of y at the gains g, from the z that h_s reads."""
        sigma, mu = _transform(self.base.h_s, z_read * g["hyper_inverse_gain"],
                               bf16).chunk(2, dim=1)
        return mu * g["gain"], sigma * g["gain"]

    # ------------------------------------------------------------------ rate points

    @property
    def max_rate_index(self) -> int:
        return (self.num_rates - 1) * RATE_STEPS

    def rate_for_lmbda(self, lmbda: float) -> int:
        """The grid index whose λ is nearest `lmbda` (in log), clamped to the range."""
        return grid_index_for_lmbda(self.lmbdas, lmbda)

    def rate_lmbda(self, index: int) -> float:
        """λ at grid index `index`, interpolated exponentially like the gains."""
        return float(_interpolate(np.log(self.lmbdas), index))

    @torch.no_grad()
    def gain_tables(self) -> GainTables:
        """The gains of every grid point, in float64 then stored as float32 (run at export)."""
        out = {}
        for name in GAIN_NAMES:
            logs = np.log(getattr(self, name).detach().abs().double().cpu().numpy())
            rows = [_interpolate(logs, i) for i in range(self.max_rate_index + 1)]
            out[name] = torch.from_numpy(np.stack(rows).astype(np.float32))
        return GainTables(**out)

    def materialize(self, tables: GainTables, index: int) -> MeanScaleHyperprior:
        """A plain MeanScaleHyperprior that computes this model at grid index `index`."""
        if not 0 <= index <= self.max_rate_index:
            raise ValueError(f"rate index {index} outside 0..{self.max_rate_index}")
        return fold(self.base, tables.row(index))


def _transform(layers: nn.Sequential, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """layers(x); with bf16, all but the last layer under bfloat16 autocast."""
    if not bf16:
        return layers(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        h = layers[:-1](x)
    return layers[-1](h.float())


def grid_index_for_lmbda(lmbdas: tuple[float, ...], lmbda: float) -> int:
    """The grid index whose λ is nearest `lmbda` (in log) on the grid of the trained λ
    points `lmbdas`, clamped to the range. From the λ alone, so a registry entry answers
    it without its weights (pipeline.settings, for every superseded model)."""
    lo, hi = math.log(lmbdas[0]), math.log(lmbdas[-1])
    v = min(max(math.log(lmbda), lo), hi)
    r = max(i for i in range(len(lmbdas)) if math.log(lmbdas[i]) <= v + 1e-12)
    if r == len(lmbdas) - 1:
        return r * RATE_STEPS
    a, b = math.log(lmbdas[r]), math.log(lmbdas[r + 1])
    return r * RATE_STEPS + round((v - a) / (b - a) * RATE_STEPS)


def _lerp_logs(logs: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Rows of `logs` (trained points) linearly interpolated at positions r (B,): the torch
    form of `_interpolate`, with r = grid index / RATE_STEPS."""
    lo = r.floor().long().clamp(max=logs.shape[0] - 1)
    hi = (lo + 1).clamp(max=logs.shape[0] - 1)
    t = (r - lo).to(logs.dtype)[:, None]
    return (1.0 - t) * logs[lo] + t * logs[hi]


def _interpolate(logs: np.ndarray, index: int) -> np.ndarray:
    """exp of the linear interpolation of `logs` (rows = trained points) at a grid index."""
    r, step = divmod(index, RATE_STEPS)
    if step == 0:
        return np.exp(logs[r])
    t = step / RATE_STEPS
    return np.exp((1.0 - t) * logs[r] + t * logs[r + 1])


def grid_from_trained_rows(trained: np.ndarray) -> np.ndarray:
    """The float32 gain table of every grid index, predicted from its trained points' rows
    (R, C) with IEEE basic operations only (division, square root, multiplication: correctly
    rounded, so the same bits on every machine, unlike exp and log). Between trained rows a
    and b, row s of RATE_STEPS is a * ((b / a)^(1/RATE_STEPS))^s, the root taken by repeated
    square roots. What `gain_tables` computes with exp and log agrees to the last float32
    bit on the shipped models, so codec.weight_store stores only the trained rows and the
    (zero) difference; a gain that is 0 or not finite predicts 0."""
    if RATE_STEPS & (RATE_STEPS - 1):
        raise ValueError("RATE_STEPS must be a power of two (roots by square roots)")
    rows = trained.astype(np.float64)
    out = np.empty(((len(rows) - 1) * RATE_STEPS + 1, rows.shape[1]))
    with np.errstate(all="ignore"):
        for r in range(len(rows) - 1):
            root = rows[r + 1] / rows[r]
            for _ in range(RATE_STEPS.bit_length() - 1):
                root = np.sqrt(root)
            g = rows[r].copy()
            for step in range(RATE_STEPS):
                out[r * RATE_STEPS + step] = g
                g = g * root
    out[-1] = rows[-1]
    return np.where(np.isfinite(out) & (out > 0), out, 0.0).astype(np.float32)


@dataclass
class GainTables:
    """Gains per grid index (rows), float32: what the stored model defines a rate point by."""

    gain: torch.Tensor  # (G, M)
    inverse_gain: torch.Tensor  # (G, M)
    hyper_gain: torch.Tensor  # (G, N)
    hyper_inverse_gain: torch.Tensor  # (G, N)

    def row(self, index: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[index].float() for name in GAIN_NAMES}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"gains.{name}": getattr(self, name).float() for name in GAIN_NAMES}

    @classmethod
    def from_state_dict(cls, s: dict[str, torch.Tensor]) -> GainTables:
        return cls(**{name: s[f"gains.{name}"].float() for name in GAIN_NAMES})


@torch.no_grad()
def fold(base: MeanScaleHyperprior, g: dict[str, torch.Tensor]) -> MeanScaleHyperprior:
    """Fold per-channel gains into a copy of `base`'s weights (float32 products)."""
    model = copy.deepcopy(base).cpu().float().eval()
    gain, inverse, hyper, hyper_inverse = (g[n] for n in GAIN_NAMES)
    a_last, hs_first, hs_last = model.g_a[-1], model.h_s[0], model.h_s[-1]
    a_last.weight.mul_(gain.view(-1, 1, 1, 1))          # y' = gain * g_a(x)
    a_last.bias.mul_(gain)
    model.h_a[0].weight.div_(gain.view(1, -1, 1, 1))    # h_a reads the un-gained y
    model.h_a[-1].weight.mul_(hyper.view(-1, 1, 1, 1))  # z' = hyper_gain * h_a(y)
    model.h_a[-1].bias.mul_(hyper)
    # h_s(hyper_inverse * z'): ConvTranspose2d weights are (C_in, C_out, k, k)
    hs_first.weight.mul_(hyper_inverse.view(-1, 1, 1, 1))
    out_gain = torch.cat([gain, gain])  # (sigma', mu') = gain * (sigma, mu)
    hs_last.weight.mul_(out_gain.view(-1, 1, 1, 1))
    hs_last.bias.mul_(out_gain)
    model.g_s[0].weight.mul_(inverse.view(-1, 1, 1, 1))  # g_s(inverse_gain * y_hat')
    return model


@torch.no_grad()
def widen(model: GainedMeanScaleHyperprior, M: int, seed: int = 0
          ) -> GainedMeanScaleHyperprior:
    """A copy of `model` with M > model.M latent channels that computes the same function.

    Why: the latent width caps quality. With M=96 channels per 16x16x3 pixels, the
    transforms without any quantization reconstruct bsds500/val at 31.4 dB, which is where
    msh-vr2's top rate point stops; a linear PCA of 16x16 blocks keeping 96 / 192 / 256
    coefficients gives 30.2 / 36.0 / 41.2 dB (docs/results.md). Training a wider model from
    scratch costs far more steps than a CPU has; widening keeps every trained weight.

    Every layer that does not touch M is copied; h_s gains fresh hidden units whose
    weights into the old outputs are zero; each new latent channel is a split of an old one
    (`split_channels`), so the image, z, mu and sigma of the old channels are unchanged and
    the new channels carry signal from the first step. (The first widening gave the new
    channels small random g_a weights instead: they stayed below the quantization noise,
    and after 16,000 steps one of 96 carried any bits; docs/results.md.)
    """
    m, N = model.M, model.N
    if m >= M:
        raise ValueError(f"widen to M={M}: the model already has M={m}")
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        wide = GainedMeanScaleHyperprior(N, M, model.lmbdas)  # fresh init for the new parts
    old, new = model.base, wide.base
    for name in ("g_a", "g_s", "h_a", "h_s"):  # every layer that does not touch M: copied
        for i, layer in enumerate(getattr(old, name)):
            target = getattr(new, name)[i]
            if all(p.shape == q.shape for p, q in zip(layer.parameters(), target.parameters(),
                                                       strict=True)):
                target.load_state_dict(layer.state_dict())
    new.p_z.load_state_dict(old.p_z.state_dict())

    a = new.g_a[-1]  # conv N -> M
    a.weight[:m], a.bias[:m] = old.g_a[-1].weight, old.g_a[-1].bias
    s = new.g_s[0]  # deconv M -> N, weight (C_in, C_out, k, k)
    s.weight[:m], s.bias[:] = old.g_s[0].weight, old.g_s[0].bias
    h = new.h_a[0]  # conv M -> N
    h.weight[:, :m], h.bias[:] = old.h_a[0].weight, old.h_a[0].bias
    h1, h2, h3 = new.h_s[0], new.h_s[2], new.h_s[4]
    o1, o2, o3 = old.h_s[0], old.h_s[2], old.h_s[4]
    h1.weight[:, :m], h1.bias[:m] = o1.weight, o1.bias  # deconv N -> M (hidden)
    k2 = o2.weight.shape[1]  # deconv M -> 3M/2: old hidden units ignore the new inputs
    h2.weight[m:, :k2] = 0.0
    h2.weight[:m, :k2], h2.bias[:k2] = o2.weight, o2.bias
    h3.weight.zero_()  # conv 3M/2 -> 2M: (sigma, mu) = chunk(2); old outputs read old units
    h3.bias.zero_()
    for out_old, out_new in ((slice(0, m), slice(0, m)), (slice(m, 2 * m), slice(M, M + m))):
        h3.weight[out_new, :k2], h3.bias[out_new] = o3.weight[out_old], o3.bias[out_old]
    for name in GAIN_NAMES:
        g_old, g_new = getattr(model, name), getattr(wide, name)
        g_new[:, :g_old.shape[1]] = g_old
    split_channels(wide, range(m, M), [i % m for i in range(M - m)])
    return wide


@torch.no_grad()
def split_channels(model: GainedMeanScaleHyperprior, targets: Iterable[int],
                   sources: Iterable[int]) -> None:
    """Make latent channel t a copy of channel s, for each (t, s), in place (Net2WiderNet's
    split, Chen et al. 2016): t gets s's g_a filter, (sigma, mu) outputs and gains, and s's
    weights into g_s and h_a are halved and shared between the two, so without noise the
    image and z are unchanged; with quantization noise the two copies average it down, and
    independent noise (and rate) gradients make them diverge. Why a split and not a fresh
    channel: a channel whose latents start below the quantization step gets almost no
    gradient through the noise and stays unused (docs/results.md, msh-vr3)."""
    b, M = model.base, model.M
    a, s, h, hs = b.g_a[-1], b.g_s[0], b.h_a[0], b.h_s[-1]
    for t, src in zip(targets, sources, strict=True):
        if t == src:
            raise ValueError(f"channel {t} cannot be split into itself")
        a.weight[t], a.bias[t] = a.weight[src], a.bias[src]
        s.weight[src] *= 0.5
        s.weight[t] = s.weight[src]
        h.weight[:, src] *= 0.5
        h.weight[:, t] = h.weight[:, src]
        for row, src_row in ((t, src), (M + t, M + src)):  # the sigma row, then the mu row
            hs.weight[row], hs.bias[row] = hs.weight[src_row], hs.bias[src_row]
        for name in ("gain", "inverse_gain"):
            getattr(model, name)[:, t] = getattr(model, name)[:, src]


def split_parameters(model: GainedMeanScaleHyperprior) -> list[nn.Parameter]:
    """The tensors `split_channels` writes (an optimizer's state for them is stale after)."""
    b = model.base
    return [b.g_a[-1].weight, b.g_a[-1].bias, b.g_s[0].weight, b.h_a[0].weight,
            b.h_s[-1].weight, b.h_s[-1].bias, model.gain, model.inverse_gain]
