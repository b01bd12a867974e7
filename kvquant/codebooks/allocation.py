"""Codebooks of a Gaussian pair per head, code levels allocated over channels by water-filling
the Fisher-weighted distortion (:func:`kvquant.core.allocate.water_fill`), and the per-channel
tables that hold an allocation."""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch
from tqdm.auto import tqdm

from kvquant.core import pair_codebooks as pcb
from kvquant.core.allocate import water_fill
from kvquant.core.packing import LEVEL_PACKING, level_bits


@lru_cache(maxsize=4096)
def cached_pair_books(method: str, bits_q: int, bits_k: int, rho: float, m_q: float, m_k: float):
    return pcb.gaussian_pair_codebooks(method, bits_q, bits_k, rho, m_q, m_k)


@lru_cache(maxsize=4096)
def cached_level_book(method: str, levels: int, rho: float):
    return pcb.gaussian_level_codebook(method, levels, rho)


def rounded_stat(v: float) -> float:
    """Statistics rounded to 0.01 before building, so near-identical heads share the work
    (a change of 0.01 in ρ or in μ/σ moves the pair error by well under 0.1%)."""
    return round(float(v), 2)


def allocate_levels(book, fisher: dict[str, np.ndarray], channel_fisher: dict[str, np.ndarray], caps: dict[str, int],
                    budget: float, nodes: np.ndarray, min_levels: int = 2) -> dict[str, np.ndarray]:
    """Levels per (layer, head, channel) of each side (``"q"``, ``"k"``) by :func:`kvquant.core.allocate.water_fill`.

    Unit: one channel of one head, quantized with its head's n-level codebook ``book(side, layer,
    head, n)``; options n ∈ {2, 3, 4, 5, 8, 16, …, 2^cap} at their packed bits (3 levels 1.6 bits,
    5 levels 2.33; :data:`kvquant.core.packing.LEVEL_PACKING`). Its distortion with n levels is the
    diagonal-Fisher (second-order) estimate of the calibration loss increase,
    ``D(n) = ½ F_c · ε(n)``: ``F_c = channel_fisher[side][layer, head, c]`` (Σ half² · (∂loss/∂x)²
    over the channel's entries) times the head's Fisher-weighted mean squared error in x̃ units,
    ``ε(n) = Σ_i f_i (node_i − Q_n(node_i))² / Σ_i f_i`` with ``f = fisher[side][layer, head]``
    (the channels of a head share its x̃ histogram). Summed over a head's channels this is the
    head's own estimate ``½ Σ_i f_i (node_i − Q_n(node_i))²``; the loss is one scale for every
    layer, head and side. Channels differ a lot — a channel's error is multiplied by its partners'
    values, and its range by the group's — so the budget moves to where it lowers the loss most.
    Cost of a bit: ``1 / (2 · L · H_side · D)`` of the average ``½(mean_q bits + mean_k bits)``
    (``1 / (L · H_k · D)`` of the keys' mean when ``fisher`` holds the keys only).
    Every channel gets between ``min_levels`` (2, or 1: 0 bits, every entry decoded as the mean,
    ``ε(1) = Σ f_i node_i² / Σ f_i``; no ``book`` is asked for it) and 2^cap levels (cap = its
    side's bits).
    """
    if min_levels not in (1, 2):
        raise ValueError(f"min_levels is 1 or 2, got {min_levels!r}")
    options = [1] * (min_levels == 1) + [n for n in sorted(LEVEL_PACKING) if n <= 2 ** max(caps.values())]
    option_bits = np.array([level_bits(n) for n in options])
    curves, costs, his, shapes = [], [], [], {}
    for side, weight in fisher.items():
        L, H, _ = weight.shape
        chan = channel_fisher[side]
        D = chan.shape[-1]
        shapes[side] = (L, H, D)
        top = options.index(2 ** caps[side])
        eps = np.zeros((L, H, len(options)))
        for layer, h in itertools.product(range(L), range(H)):
            total = weight[layer, h].sum()
            for i, n in enumerate(options[: top + 1]):
                err = (weight[layer, h] @ nodes**2 if n == 1
                       else pcb.histogram_distortion(book(side, layer, h, n), nodes, weight[layer, h]))
                eps[layer, h, i] = err / total if total > 0 else 0.0
        curves.append((0.5 * chan[..., None] * eps[:, :, None, :]).reshape(-1, len(options)))
        costs.append(np.full(L * H * D, 1 / (len(fisher) * L * H * D)))
        his.append(np.full(L * H * D, top))
    chosen = water_fill(np.concatenate(curves), np.concatenate(costs), budget, 0, np.concatenate(his), option_bits)
    levels = np.array(options)[chosen]
    out, start = {}, 0
    for side, shape in shapes.items():
        n = int(np.prod(shape))
        out[side] = levels[start : start + n].reshape(shape)
        start += n
    return out


#: A unit Gaussian on a grid (σ units, ±8σ): what a static side's normalised entries are modelled
#: by when its levels are allocated (:func:`allocate_static_levels`).
GAUSS_NODES = np.linspace(-8.0, 8.0, 2001)
GAUSS_WEIGHT = np.exp(-0.5 * GAUSS_NODES**2) / np.exp(-0.5 * GAUSS_NODES**2).sum()


@lru_cache(maxsize=None)
def expected_max_abs_gaussian(n: int) -> float:
    """E[max of n independent |N(0, 1)|] = ∫₀^∞ 1 − erf(x/√2)^n dx (≈ 2.60 for n = 64): where a
    token of n whitened components has its largest entry on average (trapezoid rule, x ≤ 12)."""
    x = torch.linspace(0.0, 12.0, 24001, dtype=torch.float64)
    return float(torch.trapezoid(1.0 - torch.erf(x / math.sqrt(2.0)) ** n, x))


def allocate_static_levels(method: str, rho: torch.Tensor, channel_fisher: np.ndarray, cap: int,
                           budget: float, min_levels: int = 2) -> np.ndarray:
    """Levels (L, H, D) of a static-norm side (``channel``/``channel-token``: x̃ = (x − μ_c)/σ_c,
    the head's pair codebook) by :func:`allocate_levels` with every head's x̃ modelled as a unit
    Gaussian: ``ε(n)`` is the MSE of the head's n-level codebook (:func:`cached_level_book`, ρ the
    head's), ``F_c`` the calibration's ``channel_fisher`` (L, H, D). Mean code bits ``budget``,
    each channel between ``min_levels`` (2, or 1: the channel set to its mean) and ``2^cap`` levels."""
    L, H, _ = channel_fisher.shape
    weight = np.broadcast_to(GAUSS_WEIGHT, (L, H, GAUSS_NODES.size))
    stats = sorted({rounded_stat(r) for r in rho.flatten().tolist()})
    todo = list(itertools.product(stats, [n for n in sorted(LEVEL_PACKING) if n <= 2**cap]))
    for r, n in tqdm(todo, desc="query codebooks", unit="book", leave=False):  # pair-Lloyd: ~0.5 s each
        cached_level_book(method, n, r)

    def book(side: str, layer: int, h: int, n: int):
        return cached_level_book(method, n, rounded_stat(rho[layer, h]))

    return allocate_levels(book, {"q": weight}, {"q": channel_fisher}, {"q": cap}, budget, GAUSS_NODES, min_levels)["q"]


def channel_tables(book, levels: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The tables that hold an allocation ``levels`` (L, H, D): ``(bits, centers (L, H, D, K),
    boundaries (L, H, D, K − 1))`` with K = 2^bits the next power of two of the most levels; a
    channel with n levels gets ``book(layer, head, n)``, its boundaries padded with +inf (codes
    never reach them) and its centers with its last center (:class:`kvquant.codebooks.SideBooks`);
    a channel with one level decodes every code to 0 (its mean; its boundaries all +inf: code 0)."""
    L, H, D = levels.shape
    bits = math.ceil(math.log2(int(levels.max())))
    k = 2**bits
    centers, bounds = torch.empty(L, H, D, k), torch.full((L, H, D, k - 1), math.inf)
    for layer, h in itertools.product(range(L), range(H)):
        table_c, table_b = torch.empty(k + 1, k), torch.full((k + 1, k - 1), math.inf)  # row n: n levels
        table_c[1] = 0.0
        for n in levels[layer, h].unique().tolist():
            if n == 1:
                continue
            book_n = book(layer, h, n)
            table_c[n, :n], table_c[n, n:] = torch.from_numpy(book_n.centers), float(book_n.centers[-1])
            table_b[n, : n - 1] = torch.from_numpy(book_n.boundaries)
        rows = levels[layer, h].long()
        centers[layer, h], bounds[layer, h] = table_c[rows], table_b[rows]
    return bits, centers, bounds
