"""Image quality and rate measures used in reports."""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0  # identical images report 100 dB rather than infinity (JSON/Parquet friendly)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return psnr_from_mse(mse / 255.0**2)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of an MSE measured on [0, 1] pixels."""
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, -10.0 * math.log10(mse))


def bpp(num_bytes: int, width: int, height: int) -> float:
    return num_bytes * 8.0 / (width * height)
