"""Bit allocation at a fixed average budget: discrete reverse water-filling (pure numpy).

Units u (here: one channel of a (layer, query head) or a (layer, KV head)) each have a
distortion curve ``D_u(b)``, the error their quantizer adds at ``b`` bits, all in the same units
(for kvquant: the diagonal-Fisher estimate of the calibration loss increase,
:func:`kvquant.codebooks.allocate_bits`), and a cost ``c_u`` per bit in units of the average
budget (a unit holding a fraction ``c_u`` of the entries that the average runs over).

Minimise ``Σ_u D_u(b_u)`` subject to ``Σ_u c_u b_u ≤ B`` with integer ``b_u ∈ [lo_u, hi_u]``.
At high rate ``D_u(b) = a_u 2^{−2b}`` and the solution is reverse water-filling,
``b_u = B + ½ log2(a_u / ā)`` (ā the cost-weighted geometric mean of the ``a``): units whose
errors cost more get more bits. The discrete version used here is the greedy marginal-return
rule — start every unit at ``lo_u`` and keep giving one bit to the unit with the largest
``(D_u(b_u) − D_u(b_u + 1)) / c_u`` that still fits the budget — which is optimal when every
curve is convex and decreasing (Fox, 1966) and a close approximation otherwise.
"""

from __future__ import annotations

import heapq

import numpy as np


def water_fill(curves: np.ndarray, costs: np.ndarray, budget: float, lo: np.ndarray | int,
               hi: np.ndarray | int) -> np.ndarray:
    """Integer bits per unit, greedy marginal allocation of ``budget``.

    ``curves``: (U, M) with ``curves[u, b]`` the distortion of unit u at b bits (columns below
    ``lo_u`` and above ``hi_u`` are not read; M > max hi); ``costs``: (U,) budget per bit of each
    unit (> 0); ``lo``/``hi``: (U,) or scalars, the allowed range of bits per unit.
    Returns (U,) int64 bits with ``Σ costs · bits ≤ budget`` (up to 1e-9 relative).
    Raises ValueError if even ``lo`` everywhere does not fit, or on non-finite curves.
    """
    curves = np.asarray(curves, np.float64)
    costs = np.asarray(costs, np.float64)
    n = curves.shape[0]
    lo = np.broadcast_to(np.asarray(lo, np.int64), (n,)).copy()
    hi = np.broadcast_to(np.asarray(hi, np.int64), (n,)).copy()
    if costs.shape != (n,) or (costs <= 0).any():
        raise ValueError(f"costs must be {n} positive numbers, got shape {costs.shape}")
    if (lo > hi).any() or lo.min(initial=0) < 0 or hi.max(initial=0) >= curves.shape[1]:
        raise ValueError(f"need 0 <= lo <= hi < {curves.shape[1]} (the curves' columns)")
    cols = np.arange(curves.shape[1])[None, :]
    used_cols = (cols >= lo[:, None]) & (cols <= hi[:, None])
    if not np.isfinite(curves[np.broadcast_to(used_cols, curves.shape)]).all():
        raise ValueError("distortion curves must be finite")
    tol = 1e-9 * max(abs(budget), 1.0)
    spent = float(costs @ lo)
    if spent > budget + tol:
        raise ValueError(f"budget {budget:g} is below the minimum allocation ({spent:g} at the lowest bits)")
    bits = lo.copy()
    heap = [(-(curves[u, bits[u]] - curves[u, bits[u] + 1]) / costs[u], u) for u in range(n) if bits[u] < hi[u]]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        if spent + costs[u] > budget + tol:
            continue  # does not fit now, and never will (spent only grows)
        bits[u] += 1
        spent += costs[u]
        if bits[u] < hi[u]:
            heapq.heappush(heap, (-(curves[u, bits[u]] - curves[u, bits[u] + 1]) / costs[u], u))
    return bits
