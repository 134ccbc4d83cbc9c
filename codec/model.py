"""Mean-Scale Hyperprior (Minnen et al. 2018 without the context model).

Transforms as in Ballé et al. 2018: g_a / g_s are four 5x5 stride-2 (de)convolutions with
GDN / IGDN; h_a / h_s are the hyper-analysis and hyper-synthesis with ReLU. h_s outputs the
mean mu and the scale sigma of the Gaussian conditional p(y | z_hat). z has a factorized,
non-parametric density.

Coding lattice. y is quantized relative to its predicted mean: y_hat = mu + k with integer
k (Minnen et al. 2018), so every y table is a zero-mean discretized Gaussian chosen by a
scale index alone; z is quantized to integers, z_hat = round(z). See docs/codec.md.
"""

from __future__ import annotations

import torch
from torch import nn

from codec.bitstream import PAD_MULTIPLE
from codec.entropy_models import FactorizedDensity, gaussian_likelihood
from codec.gdn import GDN

DOWNSAMPLE = PAD_MULTIPLE  # total stride of g_a then h_a: images are padded to this multiple
Y_STRIDE = 16
Z_STRIDE = 64


def conv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)


def deconv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=s, padding=k // 2, output_padding=s - 1)


class MeanScaleHyperprior(nn.Module):
    def __init__(self, N: int = 128, M: int = 192) -> None:
        super().__init__()
        self.N, self.M = N, M
        self.g_a = nn.Sequential(
            conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M)
        )
        self.g_s = nn.Sequential(
            deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
            deconv(N, N), GDN(N, inverse=True), deconv(N, 3),
        )
        self.h_a = nn.Sequential(
            conv(M, N, 3, 1), nn.ReLU(), conv(N, N), nn.ReLU(), conv(N, N)
        )
        self.h_s = nn.Sequential(
            deconv(N, M), nn.ReLU(), deconv(M, M * 3 // 2), nn.ReLU(),
            conv(M * 3 // 2, 2 * M, 3, 1),
        )
        self.p_z = FactorizedDensity(N)

    def hyper_synthesis(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of p(y | z_hat). sigma is raw: the likelihood lower-bounds it."""
        sigma, mu = self.h_s(z_hat).chunk(2, dim=1)
        return mu, sigma

    def likelihoods(self, y_hat: torch.Tensor, z_hat: torch.Tensor,
                    mu: torch.Tensor | None = None, sigma: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mu is None or sigma is None:
            mu, sigma = self.hyper_synthesis(z_hat)
        return gaussian_likelihood(y_hat, mu, sigma), self.p_z.likelihood(z_hat)

    def forward(self, x: torch.Tensor) -> dict:
        """Training forward with the uniform-noise relaxation (paper Eq. 3)."""
        y = self.g_a(x)
        z = self.h_a(y)
        z_tilde = z + torch.empty_like(z).uniform_(-0.5, 0.5)
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        y_lik, z_lik = self.likelihoods(y_tilde, z_tilde)
        return {"x_hat": self.g_s(y_tilde), "likelihoods": {"y": y_lik, "z": z_lik}}
