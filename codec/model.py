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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codec.bitstream import PAD_MULTIPLE, Y_BLOCK
from codec.entropy_models import FactorizedDensity, gaussian_likelihood
from codec.gdn import GDN, igdn_channels_last_

DOWNSAMPLE = PAD_MULTIPLE  # total stride of g_a then h_a: images are padded to this multiple
Y_STRIDE = Y_BLOCK


def with_uniform_noise(v: torch.Tensor) -> torch.Tensor:
    """v + u, u ~ U(-0.5, 0.5): the training relaxation of rounding (paper Eq. 3)."""
    return v + torch.empty_like(v).uniform_(-0.5, 0.5)


def conv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)


def deconv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=s, padding=k // 2, output_padding=s - 1)


def polyphase(deconv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A transposed conv of stride s as a stride-1 conv with s*s*C_out "phase" channels.

    Output pixel (s*m + a, s*n + b) of the transposed conv, channel c, is channel
    (a*s + b)*C_out + c at (m, n) of this conv: each phase's taps of the kernel, zero
    elsewhere, so the result is the same up to float rounding. For 5x5/2 it is a 3x3 conv
    with padding 1 giving 4*C_out channels. Returns (weight, bias) for F.conv2d.
    """
    (k, _), (s, _), (p, _) = deconv.kernel_size, deconv.stride, deconv.padding
    op = deconv.output_padding[0]
    if (deconv.groups != 1 or deconv.dilation != (1, 1) or len({*deconv.kernel_size}) != 1
            or len({*deconv.stride}) != 1 or len({*deconv.padding}) != 1
            or k + op - 2 * p != s):
        raise ValueError(f"{deconv} has no polyphase form here (output must be stride x input)")
    # output s*m + a reads input m + d through tap j = a + p - s*d, where 0 <= j < k
    taps = [d for a in range(s) for d in range(-k, k + 1) if 0 <= a + p - s * d < k]
    lo, hi = min(taps), max(taps)
    if lo != -hi:
        raise ValueError(f"{deconv}: asymmetric polyphase padding ({lo}, {hi})")
    w = deconv.weight.detach()  # (C_in, C_out, k, k)
    C_in, C_out = w.shape[:2]
    size = hi - lo + 1
    kernel = w.new_zeros(s, s, C_out, C_in, size, size)
    for a in range(s):
        for b in range(s):
            for t, d in enumerate(range(lo, hi + 1)):
                for u, e in enumerate(range(lo, hi + 1)):
                    i, j = a + p - s * d, b + p - s * e
                    if 0 <= i < k and 0 <= j < k:
                        kernel[a, b, :, :, t, u] = w[:, :, i, j].t()
    bias = (deconv.bias.detach() if deconv.bias is not None else w.new_zeros(C_out))
    return kernel.reshape(s * s * C_out, C_in, size, size), bias.repeat(s * s)


@dataclass
class _FastSynthesis:
    """Inference-only form of g_s derived from its weights (see `Synthesis`)."""

    key: tuple
    hidden: list[tuple[nn.ConvTranspose2d, torch.Tensor, torch.Tensor]]  # deconv, beta, gamma
    weight: torch.Tensor  # last layer as a polyphase 3x3 conv, channels_last
    bias: torch.Tensor
    stride: int
    padding: int

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        x = y.contiguous(memory_format=torch.channels_last)
        for deconv, beta, gamma in self.hidden:
            x = deconv(x).contiguous(memory_format=torch.channels_last)
            igdn_channels_last_(x, beta, gamma)
        phases = F.conv2d(x, self.weight, self.bias, padding=self.padding)
        B, _, H, W = phases.shape
        s = self.stride
        C = phases.shape[1] // (s * s)
        out = torch.empty(B, C, s * H, s * W, dtype=phases.dtype,
                          memory_format=torch.channels_last)
        # phase (a, b) of input pixel (m, n) goes to (s*m + a, s*n + b): in channels_last
        # memory that is one copy of (B, H, W, a, b, C) into (B, H, a, W, b, C)
        out.permute(0, 2, 3, 1).view(B, H, s, W, s, C).copy_(
            phases.permute(0, 2, 3, 1).reshape(B, H, W, s, s, C).transpose(2, 3))
        return out


class Synthesis(nn.Sequential):
    """g_s: deconv, IGDN, deconv, IGDN, deconv, IGDN, deconv, as an nn.Sequential.

    Training and SGA (autograd on) run the modules as they are. Decoding (eval mode, no
    autograd, float32 on the CPU) runs a faster form of the same function, derived from the
    same weights when first needed and again whenever they change: channels_last
    throughout (oneDNN's transposed convolutions run near their FLOP floor there; NCHW made
    every layer convert), IGDN in place per cache-sized block (elementwise when gamma is
    diagonal, as in msh-small-q4), and the last deconv (N -> 3, slow in oneDNN) as a
    3x3 conv to 12 phase channels plus one copy. Results equal the modules' up to float
    rounding and, like theirs, do not depend on the thread count or the batch. The output
    is channels_last (same shape and values). Measurements: docs/performance.md.
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if (self.training or torch.is_grad_enabled() or y.device.type != "cpu"
                or y.dtype != torch.float32 or y.dim() != 4 or self._observed()):
            return super().forward(y)
        return self.fast()(y)

    def _observed(self) -> bool:
        """Whether someone watches the layers run (forward hooks, or a dispatch mode such as
        FlopCounterMode): then they run as they are, so that what is seen is the model."""
        return (torch._C._len_torch_dispatch_stack() > 0
                or any(m._forward_hooks or m._forward_pre_hooks for m in self))

    def reference(self, y: torch.Tensor) -> torch.Tensor:
        """The modules one after the other, whatever the mode."""
        return super().forward(y)

    def fast(self) -> _FastSynthesis:
        """The inference form for the current weights (rebuilt when a weight changes)."""
        params = list(self.parameters())
        if any(p.is_inference() for p in params):  # no version counter: build, don't cache
            return self._build_fast(())
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = self.__dict__.get("_fast")
        if cached is None or cached.key != key:
            cached = self.__dict__["_fast"] = self._build_fast(key)
        return cached

    @torch.no_grad()
    def _build_fast(self, key: tuple) -> _FastSynthesis:
        *pairs, last = list(self)
        hidden = []
        for deconv, gdn in zip(pairs[::2], pairs[1::2], strict=True):
            if not (isinstance(deconv, nn.ConvTranspose2d) and isinstance(gdn, GDN)
                    and gdn.inverse):
                raise TypeError("Synthesis expects (ConvTranspose2d, inverse GDN) pairs")
            beta, gamma = gdn.effective_params()
            diagonal = torch.diag(gamma.diagonal())
            hidden.append((deconv, beta.contiguous(),
                           gamma.diagonal().clone() if torch.equal(gamma, diagonal) else gamma))
        weight, bias = polyphase(last)
        return _FastSynthesis(key, hidden, weight.contiguous(memory_format=torch.channels_last),
                              bias.contiguous(), last.stride[0], weight.shape[-1] // 2)


class MeanScaleHyperprior(nn.Module):
    def __init__(self, N: int = 128, M: int = 192) -> None:
        super().__init__()
        self.N, self.M = N, M
        self.g_a = nn.Sequential(
            conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M)
        )
        self.g_s = Synthesis(
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
        z_tilde, y_tilde = with_uniform_noise(z), with_uniform_noise(y)
        y_lik, z_lik = self.likelihoods(y_tilde, z_tilde)
        return {"x_hat": self.g_s(y_tilde), "likelihoods": {"y": y_lik, "z": z_lik}}
