"""Image quality and rate measures used in reports."""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0  # identical images report 100 dB rather than infinity (JSON/Parquet friendly)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images of the same shape.

    Summed over bands of rows (about 256 K values, two 2 MB float64 temporaries), so a
    large image needs no full-size float64 copies (0.6 GiB each at 24 MP).
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    rows = max(1, (1 << 18) // max(1, a[0].size))  # about 256 K values per band
    sse = 0.0
    for i in range(0, len(a), rows):
        d = a[i:i + rows].astype(np.float64) - b[i:i + rows]
        sse += float(np.vdot(d, d))
    return psnr_from_mse(sse / max(a.size, 1) / 255.0**2)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of an MSE measured on [0, 1] pixels."""
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, -10.0 * math.log10(mse))


def bpp(num_bytes: int, width: int, height: int) -> float:
    return num_bytes * 8.0 / (width * height)


# ------------------------------------------------------------------ Bjøntegaard deltas
#
# G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves", ITU-T SG16
# Q.6 (VCEG), document VCEG-M33, Austin, April 2001. Each curve is fitted with its log-rate
# as a function of PSNR (BD-rate) or its PSNR as a function of log-rate (BD-PSNR), the two
# fits are integrated over the interval where both curves have data, and the mean gap is
# reported. VCEG-M33 fits a cubic polynomial through the points ("cubic"); the later
# JCT-VC practice (and what this module does by default) is the piecewise cubic
# monotone-preserving Hermite interpolation (PCHIP, Fritsch & Carlson 1980) through them,
# which does not oscillate between points of a wide sweep (scipy's PchipInterpolator).

BD_MIN_POINTS = 4  # VCEG-M33 fits a cubic: four points at least per curve
BD_METHODS = ("pchip", "cubic")


def _points(curve) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, psnr) arrays of a curve given as (bpp, psnr) pairs; rates must be positive."""
    a = np.asarray([(float(r), float(d)) for r, d in curve], dtype=np.float64).reshape(-1, 2)
    if np.any(~np.isfinite(a)) or np.any(a[:, 0] <= 0):
        raise ValueError("RD points need finite values and positive rates")
    return a[:, 0], a[:, 1]


def _strict(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by x, with points at equal x averaged so that x strictly increases."""
    ux, inverse = np.unique(x, return_inverse=True)
    uy = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return ux, uy


def _fit(x: np.ndarray, y: np.ndarray, method: str):
    """(knots, fit): y(x) through the points by scipy's PCHIP, or VCEG-M33's least-squares
    cubic; the fit is None with too few points (2 for PCHIP, 4 for the cubic)."""
    from numpy.polynomial import Polynomial
    from scipy.interpolate import PchipInterpolator  # here: psnr() users need no scipy

    if method not in BD_METHODS:
        raise ValueError(f"method must be one of {BD_METHODS}, not {method!r}")
    x, y = _strict(x, y)
    if method == "cubic":
        return x, Polynomial.fit(x, y, 3) if len(x) >= 4 else None
    return x, PchipInterpolator(x, y) if len(x) >= 2 else None


def _integral(fit, lo: float, hi: float) -> float:
    if hasattr(fit, "integrate"):  # PchipInterpolator
        return float(fit.integrate(lo, hi))
    antiderivative = fit.integ()
    return float(antiderivative(hi) - antiderivative(lo))


def _bd(xa, ya, xr, yr, method: str) -> float | None:
    (ka, fa), (kr, fr) = _fit(xa, ya, method), _fit(xr, yr, method)
    if len(ka) < BD_MIN_POINTS or len(kr) < BD_MIN_POINTS:
        return None
    lo, hi = max(ka[0], kr[0]), min(ka[-1], kr[-1])
    if hi <= lo:
        return None  # the curves do not overlap
    return (_integral(fa, lo, hi) - _integral(fr, lo, hi)) / (hi - lo)


def bd_rate(curve_a, curve_ref, method: str = "pchip") -> float | None:
    """Bjøntegaard delta rate of `curve_a` against `curve_ref`, in percent (VCEG-M33).

    Curves are sequences of (bpp, psnr) points in any order. The result is the mean
    relative rate difference at equal PSNR over the PSNR interval both curves cover:
    -10.0 means `curve_a` needs 10% fewer bits than the reference for the same quality.
    Log-rate is fitted as a function of PSNR (natural log; the percentage does not depend
    on the base), by PCHIP (default) or by VCEG-M33's cubic polynomial (``method="cubic"``).
    None when a curve has fewer than 4 distinct PSNR values or the PSNR ranges do not
    overlap: a BD-rate is not defined there.
    """
    ra, da = _points(curve_a)
    rr, dr = _points(curve_ref)
    gap = _bd(da, np.log(ra), dr, np.log(rr), method)
    return None if gap is None else float((math.exp(gap) - 1.0) * 100.0)


def bd_psnr(curve_a, curve_ref, method: str = "pchip") -> float | None:
    """Bjøntegaard delta PSNR of `curve_a` against `curve_ref`, in dB (VCEG-M33).

    The mean PSNR difference at equal rate over the log-rate interval both curves cover;
    positive means `curve_a` is better. None under the same conditions as `bd_rate`.
    """
    ra, da = _points(curve_a)
    rr, dr = _points(curve_ref)
    gap = _bd(np.log(ra), da, np.log(rr), dr, method)
    return None if gap is None else float(gap)


def rate_saving(point, curve_ref, method: str = "pchip") -> float | None:
    """Rate difference of one (bpp, psnr) point against a reference curve at equal PSNR, in %.

    The reference's log-rate is interpolated (PCHIP through its points, as in `bd_rate`) at
    the point's PSNR: -20.0 means the point needs 20% fewer bits than the reference would
    for the same PSNR. Defined with a single point, where a BD-rate is not. None when the
    PSNR lies outside the reference's PSNR range (no extrapolation) or the reference has
    fewer than 2 points.
    """
    (r,), (d,) = _points([point])
    rr, dr = _points(curve_ref)
    knots, fit = _fit(dr, np.log(rr), method)
    if fit is None or not knots[0] <= d <= knots[-1]:
        return None
    return float((r / math.exp(float(fit(d))) - 1.0) * 100.0)
