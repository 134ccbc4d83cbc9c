"""Entropy models: the factorized density p(z) and the Gaussian conditional p(y | z).

Both are continuous densities convolved with a unit-width uniform, so that the probability
of a value on the coding lattice is the density's mass on the unit interval around it
(Ballé et al. 2018). During training and during the relaxed iterative-inference methods the
same functions give the likelihood of noisy or soft-rounded values.

`freeze_*` functions turn these densities into the fixed probability tables the entropy
coder uses (see `codec.coding`). They run once, at export, and their output is stored in
the model file: the decoder never recomputes a table from floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCALE_BOUND = 0.11  # lower bound on the Gaussian scale (as in CompressAI / Minnen et al.)
LIKELIHOOD_BOUND = 1e-9  # lower bound on any likelihood, keeps log2 finite


class _LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows where it pushes x up (Ballé et al.)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bound = bound
        return torch.clamp(x, min=bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through, None


def lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    return _LowerBound.apply(x, bound)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x * (2.0**-0.5))


def gaussian_likelihood(y_hat: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """P(y_hat | mu, sigma) of the Gaussian convolved with U(-1/2, 1/2)."""
    sigma = lower_bound(sigma, SCALE_BOUND)
    v = torch.abs(y_hat - mu)  # symmetric: evaluate in the left tail for precision
    upper = _std_normal_cdf((0.5 - v) / sigma)
    lower = _std_normal_cdf((-0.5 - v) / sigma)
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)


class FactorizedDensity(nn.Module):
    """Non-parametric per-channel density for the hyperlatents z (Ballé et al. 2018, App. 6.1).

    The cumulative c(x) is a per-channel monotone function built from small matrices with
    softplus-positive weights and tanh gates; the likelihood of x is c(x + 1/2) - c(x - 1/2).
    Coding rank: 1 (every element of z is coded independently given its channel).
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3),
                 init_scale: float = 10.0) -> None:
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def _logits_cumulative(self, x: torch.Tensor) -> torch.Tensor:
        # x: (C, 1, n)
        logits = x
        for i, matrix in enumerate(self.matrices):
            logits = torch.matmul(F.softplus(matrix), logits) + self.biases[i]
            if i < len(self.factors):
                logits = logits + torch.tanh(self.factors[i]) * torch.tanh(logits)
        return logits

    def likelihood(self, z_hat: torch.Tensor, width: float = 1.0) -> torch.Tensor:
        """P(z_hat) per element: the density's mass on the bin of `width` around each value
        (unit bins: the coding lattice; finer ones: the bits-back grid, codec.bits_back);
        z_hat has shape (B, C, H, W)."""
        B, C, H, W = z_hat.shape
        v = z_hat.permute(1, 0, 2, 3).reshape(C, 1, -1)
        lower = self._logits_cumulative(v - width / 2)
        upper = self._logits_cumulative(v + width / 2)
        # Evaluate in the tail where sigmoid is most precise.
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        lik = lik.reshape(C, B, H, W).permute(1, 0, 2, 3)
        return lower_bound(lik, LIKELIHOOD_BOUND)

    @torch.no_grad()
    def pmf_table(self, support: int = 512, step: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
        """P(k) of the bin of width `step` around k * step, for integer k in
        [-support, support], per channel, in float64: (C, 2S+1)."""
        k = torch.arange(-support, support + 1, dtype=torch.float64)
        dev = self.matrices[0].device
        v = (k * step).to(dev, torch.float32).view(1, 1, -1).expand(self.channels, 1, -1)
        lower = self._logits_cumulative(v - step / 2).double()
        upper = self._logits_cumulative(v + step / 2).double()
        sign = -torch.sign(lower + upper)
        pmf = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return pmf.reshape(self.channels, -1).cpu().numpy(), k.numpy().astype(np.int64)


def gaussian_pmf(sigma: float, radius: int) -> np.ndarray:
    """P(k | 0, sigma) for k in [-radius, radius] of the discretized Gaussian, float64."""
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    v = np.abs(k)
    erfc = np.vectorize(math.erfc)
    upper = 0.5 * erfc(-(0.5 - v) / sigma / math.sqrt(2))
    lower = 0.5 * erfc(-(-0.5 - v) / sigma / math.sqrt(2))
    return upper - lower
