"""Bit allocation at a fixed average budget: discrete reverse water-filling (pure numpy).

Units u (here: one channel of a (layer, query head) or a (layer, KV head)) each have a
distortion curve ``D_u(b)``, the error their quantizer adds at ``b`` bits, all in the same units
(for kvquant: the diagonal-Fisher estimate of the calibration loss increase,
:func:`kvquant.codebooks.allocate_levels`), and a cost ``c_u`` per bit in units of the average
budget (a unit holding a fraction ``c_u`` of the entries that the average runs over).

Minimise ``Σ_u D_u(b_u)`` subject to ``Σ_u c_u b_u ≤ B``, each ``b_u`` one of the allowed options
(whole bits, or the packed bits of a level count such as 1.6 for 3 levels).
At high rate ``D_u(b) = a_u 2^{−2b}`` and the solution is reverse water-filling,
``b_u = B + ½ log2(a_u / ā)`` (ā the cost-weighted geometric mean of the ``a``): units whose
errors cost more get more bits. The discrete version used here is the greedy marginal-return
rule — start every unit at ``lo_u`` and keep moving the unit with the largest
``(D_u(b_u) − D_u(b'_u)) / (c_u (b'_u − b_u))`` to its next option ``b'_u`` while it fits the
budget — which is optimal when every curve is convex and decreasing (Fox, 1966; options off a
unit's lower convex hull are skipped, :func:`water_fill`) and a close approximation otherwise.
"""

from __future__ import annotations

import heapq

import numpy as np


def _hull(d: np.ndarray, x: np.ndarray, lo: int, hi: int) -> list[int]:
    """Columns lo…hi on the lower convex hull of the points (x_i, d_i), left to right, each lower
    than the one before: the options worth moving through (a dominated option is skipped)."""
    pts = [lo]
    for i in range(lo + 1, hi + 1):
        if d[i] >= d[pts[-1]]:
            continue
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            if (d[a] - d[b]) * (x[i] - x[b]) <= (d[b] - d[i]) * (x[b] - x[a]):
                pts.pop()  # b lies on or above the chord a–i
            else:
                break
        pts.append(i)
    return pts


def water_fill(curves: np.ndarray, costs: np.ndarray, budget: float, lo: np.ndarray | int,
               hi: np.ndarray | int, option_bits: np.ndarray | None = None) -> np.ndarray:
    """Option per unit (its bits, by default), greedy marginal allocation of ``budget``.

    ``curves``: (U, M) with ``curves[u, i]`` the distortion of unit u with option i (columns below
    ``lo_u`` and above ``hi_u`` are not read); ``option_bits``: (M,) increasing bits of each option
    (default ``0, 1, …, M−1``: option i is i bits; fractional for packed level counts such as 3
    levels at 1.6 bits); ``costs``: (U,) budget per bit of each unit (> 0); ``lo``/``hi``: (U,)
    or scalars, the allowed range of options per unit.
    Returns (U,) int64 option indices with ``Σ costs · option_bits[options] ≤ budget`` (up to
    1e-9 relative). Each unit moves along the lower convex hull of its (bits, distortion) points,
    so a dominated option is never taken (for convex curves on 0, 1, 2, … bits every option is
    on the hull and this is the plain one-bit-at-a-time greedy).
    Raises ValueError if even ``lo`` everywhere does not fit, or on non-finite curves.
    """
    curves = np.asarray(curves, np.float64)
    costs = np.asarray(costs, np.float64)
    n, m = curves.shape
    x = np.arange(m, dtype=np.float64) if option_bits is None else np.asarray(option_bits, np.float64)
    if x.shape != (m,) or (np.diff(x) <= 0).any():
        raise ValueError(f"option_bits must be {m} increasing numbers (one per column of curves)")
    lo = np.broadcast_to(np.asarray(lo, np.int64), (n,)).copy()
    hi = np.broadcast_to(np.asarray(hi, np.int64), (n,)).copy()
    if costs.shape != (n,) or (costs <= 0).any():
        raise ValueError(f"costs must be {n} positive numbers, got shape {costs.shape}")
    if (lo > hi).any() or lo.min(initial=0) < 0 or hi.max(initial=0) >= m:
        raise ValueError(f"need 0 <= lo <= hi < {m} (the curves' columns)")
    cols = np.arange(m)[None, :]
    used_cols = (cols >= lo[:, None]) & (cols <= hi[:, None])
    if not np.isfinite(curves[np.broadcast_to(used_cols, curves.shape)]).all():
        raise ValueError("distortion curves must be finite")
    tol = 1e-9 * max(abs(budget), 1.0)
    spent = float(costs @ x[lo])
    if spent > budget + tol:
        raise ValueError(f"budget {budget:g} is below the minimum allocation ({spent:g} at the lowest bits)")
    hulls = [_hull(curves[u], x, lo[u], hi[u]) for u in range(n)]
    at = np.zeros(n, np.int64)  # position on the unit's hull

    def step(u: int):
        a, b = hulls[u][at[u]], hulls[u][at[u] + 1]
        extra = costs[u] * (x[b] - x[a])
        return (-(curves[u, a] - curves[u, b]) / extra, u, extra)

    heap = [step(u) for u in range(n) if len(hulls[u]) > 1]
    heapq.heapify(heap)
    while heap:
        _, u, extra = heapq.heappop(heap)
        if spent + extra > budget + tol:
            continue  # does not fit now, and never will (spent only grows)
        at[u] += 1
        spent += extra
        if at[u] + 1 < len(hulls[u]):
            heapq.heappush(heap, step(u))
    return np.array([hulls[u][at[u]] for u in range(n)], np.int64)
