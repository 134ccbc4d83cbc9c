"""Generalized divisive normalization (Ballé et al. 2016), the nonlinearity of g_a and g_s.

GDN:  y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)
IGDN: y_i = x_i * sqrt(beta_i + sum_j gamma_ij x_j^2)   (its approximate inverse, used in g_s)

beta and gamma are kept non-negative by a squared reparametrization with a small pedestal,
as in tensorflow-compression, so that training cannot push them below their bounds.
"""

from __future__ import annotations

import torch
from torch import nn

_PEDESTAL = 2.0**-36


class _NonNegative(nn.Module):
    """Stores v with v^2 - pedestal = value and value >= minimum."""

    def __init__(self, minimum: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("pedestal", torch.tensor(_PEDESTAL), persistent=False)
        self.register_buffer(
            "bound", torch.tensor((minimum + _PEDESTAL) ** 0.5), persistent=False
        )

    def init(self, value: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.clamp(value + _PEDESTAL, min=_PEDESTAL))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = torch.maximum(v, self.bound)
        return v * v - self.pedestal


class GDN(nn.Module):
    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6,
                 gamma_init: float = 0.1) -> None:
        super().__init__()
        self.inverse = inverse
        self.beta_reparam = _NonNegative(beta_min)
        self.gamma_reparam = _NonNegative(0.0)
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma = nn.Parameter(
            self.gamma_reparam.init(gamma_init * torch.eye(channels))
        )

    def effective_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta, gamma) as the layer uses them, after the non-negative reparametrization."""
        return self.beta_reparam(self.beta), self.gamma_reparam(self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        beta, gamma = self.effective_params()
        if not torch.is_grad_enabled():
            return self._forward_lean(x, beta, gamma)
        # A matmul, not a 1x1 conv: oneDNN's 1x1 conv sums in an order that depends on the
        # thread count, and decoded pixels must not (DESIGN.md, decision 1).
        norm = torch.matmul(gamma, (x * x).reshape(B, C, H * W)).view(B, C, H, W)
        norm = norm + beta.view(1, C, 1, 1)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)

    def _forward_lean(self, x: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor
                      ) -> torch.Tensor:
        """`forward` without autograd in fewer full-size temporaries (three at most, against
        four or five: x * x is written contiguous, so the matmul needs no reshaped copy of
        it, and the normalization is done in place). The same operations on the same
        values in the same layouts, so the same results bit for bit (g_a's tiles run here
        when encoding)."""
        B, C, H, W = x.shape
        sq = torch.mul(x, x, out=x.new_empty((B, C, H, W)))
        norm = torch.matmul(gamma, sq.view(B, C, H * W)).view(B, C, H, W)
        del sq
        norm.add_(beta.view(1, C, 1, 1))
        return x * (norm.sqrt_() if self.inverse else norm.rsqrt_())


def igdn_channels_last_(x: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
                        block: int = 8192) -> torch.Tensor:
    """IGDN in place on a channels_last x (inference only): x <- x * sqrt(beta + gamma x^2).

    `gamma` is the (C, C) matrix, or its diagonal (C,) when every off-diagonal entry is
    zero, as in models trained from the usual 0.1 * I start (the reparametrization holds
    them at exactly zero): then the normalization is elementwise, the same values without
    a matmul. Channels are the contiguous axis, so neither needs a layout change, and the
    work goes per block of about `block` positions of one image, which stays in the L2
    cache instead of making five passes over memory. Blocks never span images, so an
    image's result does not depend on its batch; a matmul, not a 1x1 conv, for thread-count
    determinism as in `GDN.forward`.
    """
    B, C, H, W = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("igdn_channels_last_ needs a channels_last tensor")
    gamma_t = gamma.t() if gamma.dim() == 2 else None
    rows = max(1, block // W)
    for b in range(B):
        for h in range(0, H, rows):
            f = x[b, :, h:h + rows].permute(1, 2, 0).view(-1, C)  # (positions, C), a view
            if gamma_t is None:
                norm = (f * f).mul_(gamma).add_(beta)
            else:
                norm = torch.addmm(beta, f * f, gamma_t)
            f.mul_(norm.sqrt_())
    return x
