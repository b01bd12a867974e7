"""Closed-form optimal point density λ*(u; ρ, m) and its grid machinery (kvquant.core.density)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvquant.core import density as d
from kvquant.core import scalar as cb

RHO_C = 1.0 / math.sqrt(3.0)
CASES = [(0.0, 0.0), (0.3, 0.0), (RHO_C, 0.0), (0.8, 0.0), (-0.95, 0.0), (1.0, 0.0), (0.5, 2.0), (-0.7, 1.3), (0.9, -0.5)]


def _dlog_lambda(u, rho, m):
    """Analytic d/du log λ*(u; ρ, m) = −u/3 + (2/3) ρ (m + ρu) / ((1 − ρ²) + (m + ρu)²)."""
    a = m + rho * u
    return -u / 3.0 + (2.0 / 3.0) * rho * a / ((1.0 - rho * rho) + a * a)


def _local_maxima(u, g):
    i = np.flatnonzero((g[1:-1] > g[:-2]) & (g[1:-1] >= g[2:])) + 1
    return u[i]


def _independent_cdf(rho, m, at):
    """CDF of λ* at points ``at``: its own fine trapezoid integral on a finer, wider grid."""
    u = np.linspace(-16.0, 16.0, 320_001)
    lam = d.lambda_star(u, rho, m)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (lam[1:] + lam[:-1]) * np.diff(u))])
    return np.interp(at, u, cum / cum[-1])


# --------------------------------------------------------------------------- the formula


def test_lambda_star_formula() -> None:
    u = np.array([-2.0, 0.0, 0.5, 3.0])
    rho, m = 0.6, 0.7
    expected = np.exp(-u * u / 6.0) * ((1 - rho**2) + (m + rho * u) ** 2) ** (1.0 / 3.0)
    np.testing.assert_allclose(d.lambda_star(u, rho, m), expected, rtol=1e-14)
    # ρ = 0, m = 0: Panter–Dite exp(−u²/6)
    np.testing.assert_allclose(d.lambda_star(u, 0.0), np.exp(-u * u / 6.0), rtol=1e-14)
    # it is the general rule (f·w)^{1/3} with f Gaussian, up to a constant
    ratio = d.optimal_density(d.gaussian_pdf(u), d.pair_weight(u, rho, m)) / d.lambda_star(u, rho, m)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)


def test_lambda_star_symmetries() -> None:
    u = np.linspace(-5, 5, 101)
    for rho, m in [(0.4, 0.0), (0.8, 1.5), (-0.3, 0.7)]:
        # (ρ, m) at u equals (ρ, −m) at −u, and equals (−ρ, −m) at u
        np.testing.assert_allclose(d.lambda_star(u, rho, m), d.lambda_star(-u, rho, -m), rtol=1e-13)
        np.testing.assert_allclose(d.lambda_star(u, rho, m), d.lambda_star(u, -rho, -m), rtol=1e-13)
    # m = 0: even in u
    np.testing.assert_allclose(d.lambda_star(u, 0.7), d.lambda_star(-u, 0.7), rtol=1e-13)


@pytest.mark.parametrize("rho", [1.0000001, -1.5, 2.0, float("nan"), float("inf")])
def test_rho_outside_unit_interval_raises(rho: float) -> None:
    u = np.zeros(3)
    with pytest.raises(ValueError, match="rho"):
        d.lambda_star(u, rho)
    with pytest.raises(ValueError, match="rho"):
        d.pair_weight(u, rho)
    with pytest.raises(ValueError, match="rho"):
        d.is_bimodal(rho)
    with pytest.raises(ValueError, match="rho"):
        d.density_peaks(rho)


def test_optimal_density_validates() -> None:
    with pytest.raises(ValueError):
        d.optimal_density(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        d.optimal_density(np.array([1.0, -1.0]), np.ones(2))
    with pytest.raises(ValueError):
        d.optimal_density(np.array([1.0, np.nan]), np.ones(2))


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("rho,m", CASES)
def test_grid_density_integrates_to_one(rho: float, m: float) -> None:
    g = d.lambda_star_density(rho, m)
    assert abs(np.trapezoid(g.pdf, g.u) - 1.0) < 1e-12
    assert abs(g.integrate(g.pdf) - 1.0) < 1e-12
    assert g.cdf[0] == 0.0 and abs(g.cdf[-1] - 1.0) < 1e-12
    assert np.all(np.diff(g.cdf) >= 0)
    # proportional to λ*
    lam = d.lambda_star(g.u, rho, m)
    nz = lam > 0  # (ρ = ±1, m = 0 vanishes at u = 0)
    ratio = g.pdf[nz] / lam[nz]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    # the ±14σ grid holds all the mass: same normalising constant on a grid twice as wide
    wide = np.linspace(-28, 28, 80_001)
    mass = np.trapezoid(d.lambda_star(wide, rho, m), wide)
    assert np.trapezoid(lam, g.u) == pytest.approx(mass, rel=1e-9)


def test_panter_dite_normaliser() -> None:
    # ∫ exp(−u²/6) du = √(6π)
    g = d.lambda_star_density(0.0)
    assert g.pdf[len(g.u) // 2] == pytest.approx(1.0 / math.sqrt(6.0 * math.pi), rel=1e-9)


def test_grid_density_from_values_validates() -> None:
    u = np.linspace(-1, 1, 5)
    with pytest.raises(ValueError):
        d.GridDensity.from_values(u, -np.ones(5))
    with pytest.raises(ValueError):
        d.GridDensity.from_values(u, np.zeros(5))
    with pytest.raises(ValueError):
        d.GridDensity.from_values(u[::-1], np.ones(5))
    with pytest.raises(ValueError):
        d.GridDensity.from_values(u, np.ones(4))


# --------------------------------------------------------------------------- phase transition


def test_phase_transition_exactly_at_one_over_sqrt3() -> None:
    assert d.RHO_CRITICAL == pytest.approx(RHO_C, rel=1e-15)
    for sign in (1.0, -1.0):
        assert not d.is_bimodal(sign * (RHO_C - 1e-6))
        assert d.is_bimodal(sign * (RHO_C + 1e-6))
    assert not d.is_bimodal(0.0)
    assert d.is_bimodal(1.0)
    np.testing.assert_array_equal(d.density_peaks(RHO_C - 1e-6), [0.0])
    assert len(d.density_peaks(RHO_C + 1e-6)) == 2


@pytest.mark.parametrize("rho", [0.6, 0.7, 0.8, 0.9, 0.95, -0.75, 1.0])
def test_peaks_at_closed_form(rho: float) -> None:
    p = math.sqrt(3.0 - 1.0 / rho**2)
    np.testing.assert_allclose(d.density_peaks(rho), [-p, p], rtol=1e-14)
    # the closed form is a stationary point of λ* (analytic derivative)
    if abs(rho) < 1.0:
        assert abs(_dlog_lambda(p, rho, 0.0)) < 1e-12
    # and λ*(p) > λ*(0): a maximum, with a dip at 0
    assert d.lambda_star(np.array([p]), rho)[0] > d.lambda_star(np.array([0.0]), rho)[0]


@pytest.mark.parametrize(
    "rho,m,n_peaks",
    [
        (0.0, 0.0, 1),
        (0.5, 0.0, 1),
        (0.57, 0.0, 1),
        (0.59, 0.0, 2),
        (0.8, 0.0, 2),
        (-0.9, 0.0, 2),
        (0.9, 0.5, 2),  # bimodal, asymmetric: unequal peaks
        (-0.85, 0.4, 2),
        (0.3, 2.0, 1),  # unimodal, peak off 0
        (0.8, -1.0, 1),
        (0.6, 0.05, 1),
    ],
)
def test_peaks_match_grid_argmax(rho: float, m: float, n_peaks: int) -> None:
    peaks = d.density_peaks(rho, m)
    assert len(peaks) == n_peaks
    assert d.is_bimodal(rho, m) == (n_peaks == 2)
    # an independent grid (different span and spacing from the module's)
    u = np.linspace(-7.0, 7.0, 140_001)
    du = u[1] - u[0]
    lam = d.lambda_star(u, rho, m)
    np.testing.assert_allclose(np.sort(peaks), _local_maxima(u, lam), atol=du)
    # the global argmax is one of the reported peaks
    assert np.min(np.abs(peaks - u[np.argmax(lam)])) <= du
    # stationary: analytic derivative of log λ* is ~0 at each peak
    assert np.all(np.abs(_dlog_lambda(peaks, rho, m)) < 1e-5)
    if m != 0.0:
        assert np.all(peaks != 0.0)


def test_asymmetric_peaks_with_mean() -> None:
    # m > 0, ρ > 0: the right peak is higher and nearer 0 than the left one
    left, right = d.density_peaks(0.9, 0.5)
    assert left < 0 < right and abs(left) > abs(right)
    lam = d.lambda_star(np.array([left, right]), 0.9, 0.5)
    assert lam[1] > lam[0]
    # mirror: m → −m mirrors the peaks
    np.testing.assert_allclose(np.sort(-d.density_peaks(0.9, -0.5)), [left, right], atol=1e-6)


# --------------------------------------------------------------------------- cdf / ppf / companding


@pytest.mark.parametrize("rho,m", [(0.0, 0.0), (0.8, 0.0), (0.5, 2.0), (-0.7, 1.3)])
def test_ppf_inverts_cdf(rho: float, m: float) -> None:
    g = d.lambda_star_density(rho, m)
    # at the grid nodes where the density has mass, ppf(cdf(u)) = u
    idx = np.flatnonzero((g.cdf > 1e-9) & (g.cdf < 1 - 1e-9))[::97]
    np.testing.assert_allclose(g.ppf(g.cdf[idx]), g.u[idx], atol=1e-9)
    # and cdf(ppf(p)) = p for arbitrary p, with the cdf interpolated
    p = np.linspace(1e-6, 1 - 1e-6, 1001)
    x = g.ppf(p)
    assert np.all(np.diff(x) > 0)
    np.testing.assert_allclose(np.interp(x, g.u, g.cdf), p, atol=1e-8)
    # endpoints stay on the grid
    assert g.ppf(np.array([0.0]))[0] >= g.u[0]
    assert g.ppf(np.array([1.0]))[0] <= g.u[-1]


def test_ppf_of_gaussian_density_is_normal_quantile() -> None:
    # exp(−u²/6) is N(0, 3): its median is 0 and its 0.8413 quantile is √3
    g = d.lambda_star_density(0.0)
    p = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    np.testing.assert_allclose(g.ppf(np.array([0.5, p, 1 - p])), [0.0, math.sqrt(3), -math.sqrt(3)], atol=1e-8)


@pytest.mark.parametrize("rho,m", [(0.0, 0.0), (0.4, 0.0), (0.8, 0.0), (0.95, 0.0), (0.3, 2.0), (-0.6, 1.0)])
@pytest.mark.parametrize("levels", [2, 4, 16, 256])
def test_companded_centers_are_quantiles(rho: float, m: float, levels: int) -> None:
    g = d.lambda_star_density(rho, m)
    book = cb.compand(g, levels)
    assert book.levels == levels
    assert np.all(np.diff(book.centers) > 0)
    target = (np.arange(1, levels + 1) - 0.5) / levels
    np.testing.assert_allclose(_independent_cdf(rho, m, book.centers), target, atol=1e-6)
    # midpoint boundaries
    np.testing.assert_allclose(book.boundaries, 0.5 * (book.centers[1:] + book.centers[:-1]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("rho,m", [(0.0, 0.0), (0.5, 0.0), (0.9, 0.0), (0.9, 1.5), (-0.3, -2.0)])
def test_companded_centers_stable_under_grid_refinement(rho: float, m: float) -> None:
    coarse = d.lambda_star_density(rho, m)
    fine = d.lambda_star_density(rho, m, points=2 * d.GRID_POINTS)
    assert len(fine.u) == 2 * len(coarse.u)
    for levels in (4, 16, 256):
        diff = np.max(np.abs(cb.compand(coarse, levels).centers - cb.compand(fine, levels).centers))
        assert diff < 1e-4
        assert diff < 1e-5  # the module's documented claim (GRID_POINTS)


def test_companded_centers_symmetric_without_mean() -> None:
    for rho in (0.0, 0.5, 0.9):
        c = cb.compand(d.lambda_star_density(rho), 16).centers
        np.testing.assert_allclose(c, -c[::-1], atol=1e-9)
    # bimodal λ* puts more centers near its peaks than Panter–Dite does
    c_pd = cb.compand(d.lambda_star_density(0.0), 64).centers
    c_bi = cb.compand(d.lambda_star_density(0.95), 64).centers
    p = math.sqrt(3 - 1 / 0.95**2)
    near = lambda c: np.sum(np.abs(np.abs(c) - p) < 0.3)  # noqa: E731
    assert near(c_bi) > near(c_pd)


# --------------------------------------------------------------------------- high-resolution distortion


def test_panter_dite_constant() -> None:
    # ρ = 0: per side (1/(12K²)) (∫ φ^{1/3})³ = π√3 / (2K²); E[(XY)²] = 1
    for k in (4, 16, 256):
        assert d.gaussian_pair_hr_error(0.0, k, k) == pytest.approx(math.pi * math.sqrt(3) / k**2, rel=1e-9)
    # unequal K: the two sides add
    assert d.gaussian_pair_hr_error(0.0, 4, 16) == pytest.approx(
        math.pi * math.sqrt(3) / 2 * (1 / 16 + 1 / 256), rel=1e-9
    )


def test_hr_error_scales_as_inverse_k_squared_and_falls_with_rho() -> None:
    e16 = d.gaussian_pair_hr_error(0.8, 16, 16)
    e32 = d.gaussian_pair_hr_error(0.8, 32, 32)
    assert e16 / e32 == pytest.approx(4.0, rel=1e-12)
    errs = [d.gaussian_pair_hr_error(r, 16, 16) for r in (0.0, 0.5, 0.8, 0.95)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert d.gaussian_pair_hr_error(-0.8, 16, 16) == pytest.approx(errs[2], rel=1e-12)


@pytest.mark.parametrize("rho,m", [(0.0, 0.0), (0.8, 0.0), (0.5, 1.5)])
def test_lambda_star_minimises_hr_distortion(rho: float, m: float) -> None:
    u = d.uniform_grid()
    f, w = d.gaussian_pdf(u), d.pair_weight(u, rho, m)
    best = d.hr_distortion(f, w, u, 16)
    lam = d.lambda_star_density(rho, m)
    assert d.hr_distortion_of(lam, f, w, 16) == pytest.approx(best, rel=1e-9)
    # any other density does worse: Panter–Dite, a wider Gaussian, a wrong ρ
    others = [
        d.lambda_star_density(0.0) if (rho, m) != (0.0, 0.0) else d.lambda_star_density(0.9),
        d.GridDensity.from_values(u, np.exp(-u * u / 8.0)),
        d.lambda_star_density(0.5 * rho if rho else 0.5, m),
    ]
    for other in others:
        assert d.hr_distortion_of(other, f, w, 16) > best * (1 + 1e-6)


def test_hr_distortion_validates_levels() -> None:
    u = d.uniform_grid(points=101)
    with pytest.raises(ValueError):
        d.hr_distortion(d.gaussian_pdf(u), np.ones_like(u), u, 1)
    with pytest.raises(ValueError):
        d.hr_distortion(d.gaussian_pdf(u), np.ones_like(u), u, 2.5)
