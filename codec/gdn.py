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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        beta = self.beta_reparam(self.beta)
        gamma = self.gamma_reparam(self.gamma)
        # A matmul, not a 1x1 conv: oneDNN's 1x1 conv sums in an order that depends on the
        # thread count, and decoded pixels must not (DESIGN.md, decision 1).
        norm = torch.matmul(gamma, (x * x).reshape(B, C, H * W)).view(B, C, H, W)
        norm = norm + beta.view(1, C, 1, 1)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)
