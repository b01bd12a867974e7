"""Codebooks designed for the two factors of a product (:class:`~kvquant.core.scalar.Codebook`
in σ units), from the Gaussian pair model, from samples or from histograms.

Methods (one builder, :func:`gaussian_pair_codebooks` / :func:`sample_pair_codebooks`):

``uniform``       K evenly spaced centers on [−c, c], the clip c minimising the pair error
                  to first order (partner exact).
``lloydmax``      Lloyd–Max for the Gaussian marginal (MSE of X alone).
``lambda``        companded closed-form density λ*(u; ρ, m): ``c_i = F⁻¹((i − ½)/K)``.
``lambda-lloyd``  pair-aware Lloyd started from ``lambda`` (≤ REFINE_MAX_BITS): for X's cell i
                  ``c_i = E[X·Y·Ŷ | X ∈ i] / E[Ŷ² | X ∈ i]``, cells chosen to minimise
                  ``E[(XY − c Ŷ)² | X]``, alternating with Y (docs/theory.md §4).

The Gaussian model: ``(X, Y)`` in σ units with means ``(m_X, m_Y)`` and correlation ρ.
Expectations over it are computed by quadrature on a fine grid in X with the conditional
law ``Y | X`` integrated in closed form against Y's cells, so results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kvquant.core import density as dens
from kvquant.core.scalar import MAX_BITS, Codebook, Method, check_method, compand, levels_for_bits

#: Pair-Lloyd refines the companded λ* only up to this many bits per side: above it the
#: high-resolution density is within 0.3% of the refined codebooks (BENCHMARKS.md, synthetic
#: table) and refinement costs seconds per codebook.
REFINE_MAX_BITS = 6


#: Half-width (σ units) of the quadrature grid of the Gaussian model; φ(8) ≈ 5e-15.
_MODEL_HALF_WIDTH = 8.0


@dataclass(frozen=True)
class _SideBins:
    edges: np.ndarray  # (n-1,) values separating consecutive bins
    t0: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    nodes: np.ndarray | None = None  # (n,) grid node of each bin, when bins are a grid


def _partition(bins: _SideBins, centers: np.ndarray) -> np.ndarray:
    """Cell of each bin minimising its pair error, made monotone so cells are intervals."""
    cost = centers[None, :] ** 2 * bins.t2[:, None] - 2.0 * centers[None, :] * bins.t1[:, None]
    order = np.argsort(centers)
    assign = order[np.argmin(cost[:, order], axis=1)]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return order[np.maximum.accumulate(rank[assign])]


def _boundaries_from(bins: _SideBins, ranks: np.ndarray, centers: np.ndarray, span: float) -> np.ndarray:
    """Boundary i = edge after the last bin of cells ≤ i (bins sorted, ranks monotone).

    On a grid, the boundary is refined between the two nodes around it to where the bins'
    preferred value ``t1/t2`` crosses the midpoint of the two centers (linear interpolation),
    so boundaries are not limited to the grid's resolution.
    """
    levels = len(centers)
    first_above = np.searchsorted(ranks, np.arange(levels - 1), side="right")
    padded = np.concatenate([[bins.edges[0] - span], bins.edges, [bins.edges[-1] + span]])
    out = padded[first_above]
    if bins.nodes is None:
        return out
    n = len(bins.nodes)
    inner = (first_above > 0) & (first_above < n)
    j = np.clip(first_above, 1, n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(bins.t2 > 0, bins.t1 / bins.t2, bins.nodes)
    mid = 0.5 * (centers[:-1] + centers[1:])
    lo, hi = g[j - 1], g[j]
    ok = inner & (lo <= mid) & (mid <= hi) & (hi > lo)
    frac = np.where(ok, (mid - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    refined = bins.nodes[j - 1] + frac * (bins.nodes[j] - bins.nodes[j - 1])
    return np.maximum.accumulate(np.where(ok, refined, out))


def _side_error(bins: _SideBins, assign: np.ndarray, centers: np.ndarray) -> float:
    c = centers[assign]
    return float(np.sum(bins.t0 - 2.0 * c * bins.t1 + c * c * bins.t2))


def _lloyd_side(bins: _SideBins, centers: np.ndarray) -> tuple[Codebook, float]:
    """One pair-Lloyd step for one side: centroid on the current partition, then re-partition.

    Returns the codebook (sorted centers, boundaries of the optimal partition for them) and the
    pair error it reaches with the partner held fixed.
    """
    assign = _partition(bins, centers)
    k = len(centers)
    num = np.bincount(assign, bins.t1, minlength=k)
    den = np.bincount(assign, bins.t2, minlength=k)
    new = np.sort(np.where(den > 0, num / np.where(den > 0, den, 1.0), centers))
    return _codebook_for(bins, new)


def _codebook_for(bins: _SideBins, centers: np.ndarray) -> tuple[Codebook, float]:
    """Best partition (interval cells) for fixed sorted centers, and its pair error."""
    centers = np.sort(centers)
    assign = _partition(bins, centers)
    span = 1.0 + float(bins.edges[-1] - bins.edges[0])
    book = Codebook(centers, _boundaries_from(bins, assign, centers, span))
    return book, _side_error(bins, assign, centers)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(z)).numpy()


def _partner_moments(book: Codebook, mu: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """``E[Y Ŷ | X]`` and ``E[Ŷ² | X]`` for ``Y | X ~ N(mu, s²)``, Ŷ = book(Y). Shapes like mu."""
    s = max(s, 1e-9)
    edges = np.concatenate([[-np.inf], book.boundaries, [np.inf]])
    z = (edges[None, :] - mu[:, None]) / s  # (n, K+1)
    cdf = _normal_cdf(z)
    with np.errstate(over="ignore", invalid="ignore"):
        pdf = np.where(np.isfinite(z), np.exp(-0.5 * z * z), 0.0) / math.sqrt(2 * math.pi)
    prob = np.diff(cdf, axis=1)  # P(Y in cell j | X)
    first = mu[:, None] * prob - s * np.diff(pdf, axis=1)  # E[Y 1{Y in j} | X]
    return first @ book.centers, prob @ (book.centers**2)


@dataclass(frozen=True)
class GaussianPair:
    """Correlated Gaussian pair in σ units: X = m_x + U, Y = m_y + V, corr(U, V) = ρ."""

    rho: float = 0.0
    mean_x: float = 0.0
    mean_y: float = 0.0

    def __post_init__(self) -> None:
        dens._check_rho(self.rho)

    def swapped(self) -> "GaussianPair":
        return GaussianPair(self.rho, self.mean_y, self.mean_x)

    def side_bins(self, partner: Codebook | None, points: int) -> _SideBins:
        """Bins of X (a uniform grid in σ units, uncentered) against partner Ŷ (None = exact Y)."""
        u = np.linspace(-_MODEL_HALF_WIDTH, _MODEL_HALF_WIDTH, points)
        w = dens.gaussian_pdf(u) * (u[1] - u[0])
        x = self.mean_x + u
        mu = self.mean_y + self.rho * u
        ey2 = (1.0 - self.rho**2) + mu**2
        if partner is None:
            eyy, ey2hat = ey2, ey2
        else:
            eyy, ey2hat = _partner_moments(partner, mu, math.sqrt(max(1.0 - self.rho**2, 0.0)))
        return _SideBins(0.5 * (x[1:] + x[:-1]), w * x * x * ey2, w * x * eyy, w * ey2hat, x)

    def product_second_moment(self) -> float:
        """``E[(XY)²]`` (Isserlis, with means)."""
        r, a, b = self.rho, self.mean_x, self.mean_y
        # E[(a+U)²(b+V)²] = a²b² + a²E[V²] + b²E[U²] + 4ab E[UV] + E[U²V²]
        return a * a * b * b + a * a + b * b + 4 * a * b * r + (1 + 2 * r * r)

    def pair_error(self, book_x: Codebook, book_y: Codebook, points: int | None = None) -> float:
        """``E[(XY − X̂Ŷ)²] / E[(XY)²]`` with X̂ = book_x(X), Ŷ = book_y(Y) (σ units, uncentered).

        Quadrature on ``points`` grid nodes in X (each node's bin takes the node's cell); the
        default grid resolves each cell with ≥ 32 nodes — pass more for a reference value.
        """
        points = points or _grid_points(book_x.levels)
        bins = self.side_bins(book_y, points)
        x = self.mean_x + np.linspace(-_MODEL_HALF_WIDTH, _MODEL_HALF_WIDTH, points)
        assign = book_x.encode(x)
        return _side_error(bins, assign, book_x.centers) / self.product_second_moment()


def _grid_points(levels: int) -> int:
    """Quadrature nodes for K levels: ≥ 32 per cell, an even count so no node sits on the
    centre (a node on a symmetric boundary would break the symmetry of the cells)."""
    return max(4000, 32 * levels)


def _model_lloyd(
    model: GaussianPair, book_x: Codebook, book_y: Codebook, iters: int = 60, tol: float = 1e-6
) -> tuple[Codebook, Codebook]:
    """Pair-aware Lloyd on the Gaussian model; returns the best iterate (never worse than start)."""
    best = (book_x, book_y)
    best_err = model.pair_error(book_x, book_y)
    prev = best_err
    for _ in range(iters):
        book_x, _ = _lloyd_side(model.side_bins(book_y, _grid_points(book_x.levels)), book_x.centers)
        book_y, err = _lloyd_side(
            model.swapped().side_bins(book_x, _grid_points(book_y.levels)), book_y.centers
        )
        err /= model.product_second_moment()
        if err < best_err:
            best, best_err = (book_x, book_y), err
        if prev - err <= tol * prev:
            break
        prev = err
    return best


def _marginal_lloyd(mean: float, levels: int, start: np.ndarray, iters: int = 2000) -> Codebook:
    """Lloyd–Max for N(mean, 1), in closed form: midpoint boundaries, and each center the
    conditional mean ``mean + (φ(a) − φ(b)) / (Φ(b) − Φ(a))`` of its cell (a, b)."""
    c = np.sort(np.asarray(start, np.float64)) - mean
    for _ in range(iters):
        edges = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
        pdf = np.where(np.isfinite(edges), dens.gaussian_pdf(np.where(np.isfinite(edges), edges, 0.0)), 0.0)
        prob = np.diff(_normal_cdf(edges))
        new = np.where(prob > 0, -np.diff(pdf) / np.where(prob > 0, prob, 1.0), c)
        done = np.max(np.abs(new - c)) < 1e-12
        c = new
        if done:
            break
    return Codebook.nearest(c + mean)


def _golden_min(f, lo: float, hi: float, iters: int = 48) -> float:
    """Minimiser of a unimodal ``f`` on [lo, hi] by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def _uniform_book(levels: int, rho: float, own_mean: float, partner_mean: float) -> Codebook:
    """K evenly spaced centers on ``own_mean + [−c, c]``, c minimising the pair error to first
    order: ``E[(X − X̂)² E[Y² | X]]`` with the partner exact (a weighted MSE, by quadrature)."""
    u = np.linspace(-_MODEL_HALF_WIDTH, _MODEL_HALF_WIDTH, _grid_points(levels))
    fw = dens.gaussian_pdf(u) * dens.pair_weight(u, rho, partner_mean)

    def cost(clip: float) -> float:
        step = 2 * clip / (levels - 1)
        e = u - np.clip(np.round((u + clip) / step), 0, levels - 1) * step + clip
        return float(np.sum(fw * e * e))

    clip = _golden_min(cost, 0.05, _MODEL_HALF_WIDTH)
    return Codebook.nearest(own_mean + np.linspace(-clip, clip, levels))


def _lambda_book(levels: int, rho: float, partner_mean: float, own_mean: float) -> Codebook:
    book = compand(dens.lambda_star_density(rho, partner_mean), levels)
    return Codebook(book.centers + own_mean, book.boundaries + own_mean)


def _uncentered_pair(method: str, model: GaussianPair, kx: int, ky: int) -> tuple[Codebook, Codebook]:
    check_method(method)
    if method == "uniform":
        return (
            _uniform_book(kx, model.rho, model.mean_x, model.mean_y),
            _uniform_book(ky, model.rho, model.mean_y, model.mean_x),
        )
    if method == "lloydmax":
        pd = dens.lambda_star_density(0.0)
        return (
            _marginal_lloyd(model.mean_x, kx, model.mean_x + compand(pd, kx).centers),
            _marginal_lloyd(model.mean_y, ky, model.mean_y + compand(pd, ky).centers),
        )
    bx = _lambda_book(kx, model.rho, model.mean_y, model.mean_x)
    by = _lambda_book(ky, model.rho, model.mean_x, model.mean_y)
    if method == "lambda" or min(kx, ky) > 2**REFINE_MAX_BITS:
        return bx, by
    return _model_lloyd(model, bx, by)


def _center(book: Codebook, mean: float) -> Codebook:
    return Codebook(book.centers - mean, book.boundaries - mean)


def gaussian_pair_codebooks(
    method: Method, bits_x: int, bits_y: int, rho: float = 0.0, mean_x: float = 0.0, mean_y: float = 0.0
) -> tuple[Codebook, Codebook]:
    """Codebooks for X and Y of a correlated Gaussian pair, in *centered* σ units.

    ``rho``: correlation of the multiplying pairs; ``mean_x``, ``mean_y``: ``μ/σ`` of each side.
    The returned centers quantize ``(x − μ_X)/σ_X`` and ``(y − μ_Y)/σ_Y``. ``bits_x ≠ bits_y`` is
    allowed (e.g. more bits for keys than for queries).
    """
    model = GaussianPair(float(rho), float(mean_x), float(mean_y))
    bx, by = _uncentered_pair(method, model, levels_for_bits(bits_x), levels_for_bits(bits_y))
    return _center(bx, model.mean_x), _center(by, model.mean_y)


def gaussian_level_codebook(method: Method, levels: int, rho: float = 0.0) -> Codebook:
    """The ``levels``-level codebook (any count 2 … 256, e.g. 3 or 5 for bit allocation) of X in a
    zero-mean Gaussian pair with correlation ``rho`` whose partner has as many levels, σ units:
    :func:`gaussian_pair_codebooks`' X codebook by level count (``2^bits`` levels give the same)."""
    if int(levels) != levels or not 2 <= levels <= 2**MAX_BITS:
        raise ValueError(f"levels must be an integer in [2, {2**MAX_BITS}], got {levels!r}")
    return _uncentered_pair(method, GaussianPair(float(rho), 0.0, 0.0), int(levels), int(levels))[0]


def gaussian_centers(method: Method, bits: int, rho: float = 0.0, mean: float = 0.0) -> np.ndarray:
    """The K = 2^bits centers (σ units, centered) of X when both factors use ``bits``.

    ``mean`` is the partner's mean in its σ units (``m = μ_Y/σ_Y``); X itself is centered.
    """
    return gaussian_pair_codebooks(method, bits, bits, rho, 0.0, mean)[0].centers


def _sample_bins(x: np.ndarray, y: np.ndarray, w: np.ndarray, y_hat: np.ndarray, n_bins: int) -> _SideBins:
    order_edges = np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1])
    edges = np.unique(order_edges)
    idx = np.searchsorted(edges, x, side="right")
    n = len(edges) + 1
    return _SideBins(
        edges,
        np.bincount(idx, w * (x * y) ** 2, minlength=n),
        np.bincount(idx, w * x * y * y_hat, minlength=n),
        np.bincount(idx, w * y_hat * y_hat, minlength=n),
    )


def sample_pair_error(book_x: Codebook, book_y: Codebook, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """``Σ w (xy − x̂ŷ)² / Σ w (xy)²`` on paired samples (same units as the codebooks)."""
    w = np.ones_like(x) if w is None else w
    err = x * y - book_x(x) * book_y(y)
    return float(np.sum(w * err * err) / np.sum(w * (x * y) ** 2))


def pair_lloyd_samples(
    book_x: Codebook,
    book_y: Codebook,
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None = None,
    *,
    iters: int = 100,
    n_bins: int = 4096,
    tol: float = 1e-7,
) -> tuple[Codebook, Codebook]:
    """Pair-aware Lloyd on samples ``(x_n, y_n)`` (weights ``w_n``), started from the given books.

    Cells are unions of ``n_bins`` quantile bins of each side. Returns the iterate with the
    lowest sample pair error, so the result is never worse than the start on these samples.
    """
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be non-empty and paired, got {x.shape} and {y.shape}")
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64).ravel()
    # ≥ 64 samples per bin: with fewer, noisy per-bin preferences break the interval cells
    n_bins = max(8, min(n_bins, x.size // 64))
    best, best_err = (book_x, book_y), sample_pair_error(book_x, book_y, x, y, w)
    prev = best_err
    for _ in range(iters):
        book_x, _ = _lloyd_side(_sample_bins(x, y, w, book_y(y), n_bins), book_x.centers)
        book_y, _ = _lloyd_side(_sample_bins(y, x, w, book_x(x), n_bins), book_y.centers)
        err = sample_pair_error(book_x, book_y, x, y, w)
        if err < best_err:
            best, best_err = (book_x, book_y), err
        if abs(prev - err) <= tol * prev:
            break
        prev = err
    return best


def sample_pair_codebooks(
    method: Method, bits_x: int, bits_y: int, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None
) -> tuple[Codebook, Codebook]:
    """Codebooks for the factors of samples ``(x_n, y_n)`` already in σ units (not centered).

    The Gaussian methods are built from the samples' ρ and means (in σ units); ``lambda-lloyd``
    then refines on the samples themselves.
    """
    check_method(method)
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    w_ = np.ones_like(x) if w is None else np.asarray(w, np.float64).ravel()
    mx, my = np.average(x, weights=w_), np.average(y, weights=w_)
    sx = math.sqrt(np.average((x - mx) ** 2, weights=w_))
    sy = math.sqrt(np.average((y - my) ** 2, weights=w_))
    rho = float(np.clip(np.average((x - mx) * (y - my), weights=w_) / (sx * sy), -1.0, 1.0))
    model = GaussianPair(rho, mx / sx, my / sy)
    seed = "lambda" if method == "lambda-lloyd" else method
    bx, by = _uncentered_pair(seed, model, levels_for_bits(bits_x), levels_for_bits(bits_y))
    # back from the model's units (σ = 1) to the samples' units
    bx, by = Codebook(bx.centers * sx, bx.boundaries * sx), Codebook(by.centers * sy, by.boundaries * sy)
    if method != "lambda-lloyd":
        return bx, by
    return pair_lloyd_samples(bx, by, x, y, w_)


def _weighted_lloyd(nodes: np.ndarray, weight: np.ndarray, start: np.ndarray, iters: int = 300) -> Codebook:
    """Lloyd on weighted grid points: minimises Σ_i weight_i (node_i − Q(node_i))²."""
    bins = _SideBins(0.5 * (nodes[1:] + nodes[:-1]), weight * nodes**2, weight * nodes, weight, nodes)
    book, err = _codebook_for(bins, np.sort(start))
    for _ in range(iters):
        new, new_err = _lloyd_side(bins, book.centers)
        if new_err >= err * (1 - 1e-10):
            return new if new_err < err else book
        book, err = new, new_err
    return book


def histogram_distortion(book: Codebook, nodes: np.ndarray, weight: np.ndarray) -> float:
    """``Σ_i weight_i (node_i − Q(node_i))²``: the codebook's error on a weighted grid histogram
    (with the product-error weights of :func:`histogram_codebook`, the first-order squared error
    of the products that the histogram's entries take part in)."""
    nodes = np.asarray(nodes, np.float64)
    err = nodes - book.centers[book.encode(nodes)]
    return float(np.asarray(weight, np.float64) @ (err * err))


def histogram_codebook(method: Method, levels: int, nodes: np.ndarray, count: np.ndarray, weight: np.ndarray) -> Codebook:
    """``levels``-level codebook (2 … 256; any count, e.g. 3 or 5 for bit allocation) for a
    variable whose calibration histogram on ``nodes`` (uniform grid) has
    ``count`` entries and product-error ``weight`` (Σ E[partner²] per entry, docs/theory.md §2).

    ``uniform``: K evenly spaced centers from the first to the last node (min–max INT when the
    grid is [−1, 1]); ``lloydmax``: Lloyd on the counts (MSE of x alone); ``lambda``: companded
    empirical density ``(f · w)^{1/3}``; ``lambda-lloyd``: Lloyd on the weights (first-order pair
    error), started from ``lambda``.
    """
    check_method(method)
    if int(levels) != levels or not 2 <= levels <= 2**MAX_BITS:
        raise ValueError(f"levels must be an integer in [2, {2**MAX_BITS}], got {levels!r}")
    levels = int(levels)
    nodes, count, weight = (np.asarray(a, np.float64) for a in (nodes, count, weight))
    if weight.sum() <= 0 or count.sum() <= 0:
        raise ValueError("empty calibration histogram: no entries were seen for this head")
    if method == "uniform":
        return Codebook.nearest(np.linspace(nodes[0], nodes[-1], levels))
    if method == "lloydmax":
        start = compand(dens.GridDensity.from_values(nodes, np.cbrt(count)), levels).centers
        return _weighted_lloyd(nodes, count, start)
    book = compand(dens.GridDensity.from_values(nodes, np.cbrt(weight)), levels)
    if method == "lambda":
        return book
    return _weighted_lloyd(nodes, weight, book.centers)
