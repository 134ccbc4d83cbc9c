"""Image quality and rate measures used in reports."""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0  # identical images report 100 dB rather than infinity (JSON/Parquet friendly)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images of the same shape.

    Summed over bands of rows, so a 24 MP image needs no full-size float64 copies (those
    would be 0.6 GiB each).
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    rows = max(1, (1 << 20) // max(1, a[0].size))  # about 1 M values per band
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
# which does not oscillate between points of a wide sweep.

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


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson derivatives at the knots (the same rule as scipy's PchipInterpolator)."""
    h, delta = np.diff(x), np.diff(y) / np.diff(x)
    n = len(x)
    if n == 2:
        return np.array([delta[0], delta[0]])
    d = np.zeros(n)
    w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
    same = delta[:-1] * delta[1:] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        d[1:-1] = np.where(same, (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:]), 0.0)

    def end(h0, h1, m0, m1):
        s = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        if np.sign(s) != np.sign(m0):
            return 0.0
        if np.sign(m0) != np.sign(m1) and abs(s) > abs(3 * m0):
            return 3 * m0
        return s

    d[0] = end(h[0], h[1], delta[0], delta[1])
    d[-1] = end(h[-1], h[-2], delta[-1], delta[-2])
    return d


class _Fit:
    """y(x) through the points, by PCHIP or by a least-squares cubic; exact integrals."""

    def __init__(self, x: np.ndarray, y: np.ndarray, method: str) -> None:
        if method not in BD_METHODS:
            raise ValueError(f"method must be one of {BD_METHODS}, not {method!r}")
        self.x, self.y = _strict(x, y)
        self.method = method
        if method == "cubic":
            self.poly = np.polyint(np.polyfit(self.x, self.y, 3)) if len(self.x) >= 4 else None
        else:
            self.d = _pchip_slopes(self.x, self.y) if len(self.x) >= 2 else None

    def _segment(self, v: float) -> tuple[int, float, float]:
        k = int(np.clip(np.searchsorted(self.x, v, side="right") - 1, 0, len(self.x) - 2))
        h = self.x[k + 1] - self.x[k]
        return k, h, (v - self.x[k]) / h

    def __call__(self, v: float) -> float:
        if self.method == "cubic":
            return float(np.polyval(np.polyder(self.poly), v))
        k, h, t = self._segment(v)
        y0, y1, d0, d1 = self.y[k], self.y[k + 1], self.d[k], self.d[k + 1]
        return float((2 * t**3 - 3 * t**2 + 1) * y0 + (t**3 - 2 * t**2 + t) * h * d0
                     + (-2 * t**3 + 3 * t**2) * y1 + (t**3 - t**2) * h * d1)

    def _antiderivative(self, v: float) -> float:
        """Integral of the fit from x[0] to v."""
        if self.method == "cubic":
            return float(np.polyval(self.poly, v) - np.polyval(self.poly, self.x[0]))
        k, h, t = self._segment(v)
        full_h = np.diff(self.x)[:k]
        full = np.sum(full_h * (self.y[:k] + self.y[1:k + 1]) / 2
                      + full_h**2 * (self.d[:k] - self.d[1:k + 1]) / 12)
        y0, y1, d0, d1 = self.y[k], self.y[k + 1], self.d[k], self.d[k + 1]
        part = h * ((t**4 / 2 - t**3 + t) * y0 + (t**4 / 4 - 2 * t**3 / 3 + t**2 / 2) * h * d0
                    + (-(t**4) / 2 + t**3) * y1 + (t**4 / 4 - t**3 / 3) * h * d1)
        return float(full + part)

    def integral(self, lo: float, hi: float) -> float:
        return self._antiderivative(hi) - self._antiderivative(lo)


def _bd(xa, ya, xr, yr, method: str) -> float | None:
    fa, fr = _Fit(xa, ya, method), _Fit(xr, yr, method)
    if len(fa.x) < BD_MIN_POINTS or len(fr.x) < BD_MIN_POINTS:
        return None
    lo, hi = max(fa.x[0], fr.x[0]), min(fa.x[-1], fr.x[-1])
    if hi <= lo:
        return None  # the curves do not overlap
    return (fa.integral(lo, hi) - fr.integral(lo, hi)) / (hi - lo)


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
    fit = _Fit(dr, np.log(rr), "pchip" if method == "pchip" else method)
    if len(fit.x) < 2 or not fit.x[0] <= d <= fit.x[-1]:
        return None
    if method == "cubic" and fit.poly is None:
        return None
    return float((r / math.exp(fit(d)) - 1.0) * 100.0)
