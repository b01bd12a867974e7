"""Optimal point densities for quantizing the factors of a product (pure math, numpy only).

Setting (docs/theory.md §1): a pair ``(X, Y) = (q[t, j], k[s, j])`` multiplies inside ``Q·Kᵀ``.
X is quantized with K levels and the error it causes in the product is, for large K,
``E[e_X² · w(X)]`` with ``w(x) = E[Y² | X = x]``. The best point density is

    λ(x) ∝ (f_X(x) · w(x))^{1/3}

and the distortion it reaches is ``(1 / (12 K²)) · (∫ (f_X w)^{1/3} dx)³``.

For correlated Gaussian pairs, in σ units ``u = (x − μ_X)/σ_X`` and with ``m = μ_Y/σ_Y``,
``w(u) = σ_Y² ((1 − ρ²) + (m + ρu)²)``, which gives the closed form

    λ*(u) ∝ exp(−u²/6) · ((1 − ρ²) + (m + ρu)²)^{1/3}

(``m = 0`` is the seed paper's density; ``ρ = 0, m = 0`` is Panter–Dite's ``exp(−u²/6)``).

Everything here works on a grid in σ units: a :class:`GridDensity` holds the normalised
density, its CDF and inverse CDF, which is how densities become codebooks (companding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: |ρ| above which λ* is bimodal (seed paper's phase transition).
RHO_CRITICAL = 1.0 / math.sqrt(3.0)

#: Half-width of the default grid in σ units. exp(−u²/6) at u = 14 is 6e-15 of its peak,
#: so the truncated tail mass of λ* is below 1e-12 for every ρ.
GRID_HALF_WIDTH = 14.0
#: Default number of grid points; companded centers move < 1e-5 σ when doubled (tests).
GRID_POINTS = 40_001


def gaussian_pdf(u: np.ndarray) -> np.ndarray:
    """Standard normal density φ(u)."""
    return np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


def pair_weight(u: np.ndarray, rho: float, mean: float = 0.0) -> np.ndarray:
    """Conditional second moment of the partner, ``E[Y² | X] / σ_Y² = (1 − ρ²) + (m + ρu)²``.

    ``u`` is X in σ_X units (centered), ``mean`` is ``m = μ_Y / σ_Y``.
    """
    _check_rho(rho)
    return (1.0 - rho * rho) + (mean + rho * u) ** 2


def lambda_star(u: np.ndarray, rho: float, mean: float = 0.0) -> np.ndarray:
    """Unnormalised closed-form density ``exp(−u²/6) · ((1−ρ²) + (m+ρu)²)^{1/3}``.

    ``u``: X in σ_X units. ``rho``: correlation of the multiplying pairs.
    ``mean``: ``m = μ_Y/σ_Y``, the partner's mean in its σ units (0 in the seed paper).
    """
    return np.exp(-u * u / 6.0) * np.cbrt(pair_weight(u, rho, mean))


def optimal_density(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """General high-resolution rule ``λ ∝ (f · w)^{1/3}`` for f and w sampled on a grid."""
    f = np.asarray(f, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if f.shape != w.shape:
        raise ValueError(f"f and w must be sampled on the same grid, got shapes {f.shape} and {w.shape}")
    if np.any(f < 0) or np.any(w < 0) or not (np.all(np.isfinite(f)) and np.all(np.isfinite(w))):
        raise ValueError("f (a density) and w (a conditional second moment) must be finite and >= 0")
    return np.cbrt(f * w)


def is_bimodal(rho: float, mean: float = 0.0) -> bool:
    """Whether λ*(·; ρ) has two modes. For ``mean = 0`` this is exactly ``|ρ| > 1/√3``."""
    _check_rho(rho)
    if mean == 0.0:
        return abs(rho) > RHO_CRITICAL
    return len(density_peaks(rho, mean)) > 1


def density_peaks(rho: float, mean: float = 0.0) -> np.ndarray:
    """Locations (σ units) of the local maxima of λ*.

    For ``mean = 0``: ``[0]`` when ``|ρ| ≤ 1/√3``, else ``±√(3 − 1/ρ²)``. With a mean the
    maxima are found numerically on the default grid (refined by a parabola through the
    three grid points around each maximum).
    """
    _check_rho(rho)
    if mean == 0.0:
        if abs(rho) <= RHO_CRITICAL:
            return np.array([0.0])
        p = math.sqrt(3.0 - 1.0 / (rho * rho))
        return np.array([-p, p])
    u = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS)
    g = np.log(lambda_star(u, rho, mean) + 1e-300)
    i = np.flatnonzero((g[1:-1] > g[:-2]) & (g[1:-1] >= g[2:])) + 1
    du = u[1] - u[0]
    denom = g[i - 1] - 2 * g[i] + g[i + 1]
    shift = np.where(denom != 0, 0.5 * (g[i - 1] - g[i + 1]) / np.where(denom != 0, denom, 1), 0.0)
    return u[i] + shift * du


@dataclass(frozen=True)
class GridDensity:
    """A probability density tabulated on a uniform grid, with CDF and inverse CDF.

    ``u``: grid (σ units), ``pdf``: normalised so that ∫ pdf du = 1 (trapezoid rule),
    ``cdf``: cumulative trapezoid integral, exactly 0 at ``u[0]`` and 1 at ``u[-1]``.
    """

    u: np.ndarray
    pdf: np.ndarray
    cdf: np.ndarray

    @classmethod
    def from_values(cls, u: np.ndarray, values: np.ndarray) -> "GridDensity":
        """Normalise non-negative ``values`` sampled at uniformly spaced ``u``."""
        u = np.asarray(u, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        if u.ndim != 1 or u.shape != values.shape or len(u) < 3:
            raise ValueError("u and values must be 1-D arrays of the same length (>= 3)")
        if np.any(np.diff(u) <= 0):
            raise ValueError("grid u must be strictly increasing")
        if np.any(values < 0) or not np.all(np.isfinite(values)):
            raise ValueError("density values must be finite and >= 0")
        steps = 0.5 * (values[1:] + values[:-1]) * np.diff(u)
        total = steps.sum()
        if total <= 0:
            raise ValueError("density has zero mass on the grid")
        cdf = np.concatenate([[0.0], np.cumsum(steps)]) / total
        return cls(u=u, pdf=values / total, cdf=cdf)

    def ppf(self, p: np.ndarray) -> np.ndarray:
        """Inverse CDF at probabilities ``p`` in [0, 1].

        Between grid points the CDF is integrated exactly for a linear pdf (a quadratic), so
        the inverse is accurate to O(du³) rather than the O(du²) of linear interpolation.
        """
        p = np.asarray(p, dtype=np.float64)
        i = np.clip(np.searchsorted(self.cdf, p, side="right") - 1, 0, len(self.u) - 2)
        du = self.u[i + 1] - self.u[i]
        f0, f1 = self.pdf[i], self.pdf[i + 1]
        # Solve F(u_i + t) − F(u_i) = r for t, with pdf linear f0 + (f1 − f0) t/du on the cell.
        r = p - self.cdf[i]
        a = 0.5 * (f1 - f0) / du
        linear = np.abs(a) * du < 1e-12 * np.maximum(f0, 1e-300)
        disc = np.sqrt(np.maximum(f0 * f0 + 4 * a * r, 0.0))
        t_quad = np.where(linear, 0.0, 2 * r / np.where(f0 + disc > 0, f0 + disc, 1.0))
        t_lin = np.where(f0 > 0, r / np.where(f0 > 0, f0, 1.0), 0.0)
        t = np.where(linear, t_lin, t_quad)
        return self.u[i] + np.clip(t, 0.0, du)

    def integrate(self, g: np.ndarray) -> float:
        """Trapezoid ∫ g(u) du on this grid."""
        return float(np.trapezoid(np.asarray(g, dtype=np.float64), self.u))


def uniform_grid(half_width: float = GRID_HALF_WIDTH, points: int = GRID_POINTS) -> np.ndarray:
    """Uniform grid on ``[−half_width, half_width]`` (σ units)."""
    return np.linspace(-half_width, half_width, points)


def lambda_star_density(rho: float, mean: float = 0.0, *, points: int = GRID_POINTS) -> GridDensity:
    """λ*(u; ρ, m) normalised on the default grid."""
    u = uniform_grid(points=points)
    return GridDensity.from_values(u, lambda_star(u, rho, mean))


def hr_distortion(f: np.ndarray, w: np.ndarray, u: np.ndarray, levels: int) -> float:
    """High-resolution distortion of the optimal density: ``(1/(12K²)) (∫ (f w)^{1/3} du)³``.

    ``f``: density of X on grid ``u`` (σ units); ``w``: ``E[Y²|X=u]`` on the same grid;
    ``levels``: K. Result is in the units of ``σ_X² · w`` (for normalised Gaussians, σ_X = σ_Y = 1).
    """
    _check_levels(levels)
    integral = float(np.trapezoid(optimal_density(f, w), u))
    return integral**3 / (12.0 * levels * levels)


def hr_distortion_of(density: GridDensity, f: np.ndarray, w: np.ndarray, levels: int) -> float:
    """High-resolution distortion of a given point density λ: ``(1/(12K²)) ∫ f w / λ² du``.

    Reaches :func:`hr_distortion` exactly when λ ∝ (f w)^{1/3}. Grid points where λ = 0 but
    f·w > 0 make the integral infinite.
    """
    _check_levels(levels)
    lam = density.pdf
    fw = np.asarray(f, dtype=np.float64) * np.asarray(w, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = np.where(fw > 0, fw / (lam * lam), 0.0)
    return float(np.trapezoid(integrand, density.u)) / (12.0 * levels * levels)


def gaussian_pair_hr_error(rho: float, levels_x: int, levels_y: int) -> float:
    """Predicted ``E[(XY − X̂Ŷ)²] / E[(XY)²]`` when both sides use their λ* codebooks.

    Zero-mean unit-variance Gaussians with correlation ρ; ``E[(XY)²] = 1 + 2ρ²``. Each side
    contributes its own high-resolution distortion (the cross term e_X·e_Y vanishes to this
    order), and by symmetry both sides have the same constant.
    """
    u = uniform_grid()
    f = gaussian_pdf(u)
    w = pair_weight(u, rho)
    per_side = hr_distortion(f, w, u, levels_x), hr_distortion(f, w, u, levels_y)
    return (per_side[0] + per_side[1]) / (1.0 + 2.0 * rho * rho)


def _check_rho(rho: float) -> None:
    if not (math.isfinite(rho) and -1.0 <= rho <= 1.0):
        raise ValueError(f"rho must be a correlation in [-1, 1], got {rho!r}")


def _check_levels(levels: int) -> None:
    if int(levels) != levels or levels < 2:
        raise ValueError(f"number of levels K must be an integer >= 2, got {levels!r}")
