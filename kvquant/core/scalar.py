"""Scalar codebooks: a :class:`Codebook` is K sorted *centers* and K−1 sorted decision *boundaries*,
both in the normalised units of the variable it quantizes (σ units: ``x̃ = (x − offset) / scale``).
Value ``x̃`` gets code ``i = #{boundaries ≤ x̃}`` and is reconstructed as ``centers[i]``
(:func:`quantize`, :func:`dequantize`, :func:`fake_quantize`: the one quantizer every path runs).
Nearest-centre codebooks have midpoint boundaries; pair-aware Lloyd moves them. How codebooks are
designed for the two factors of a product: :mod:`kvquant.core.pair_codebooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kvquant.core import density as dens

Method = Literal["uniform", "lloydmax", "lambda", "lambda-lloyd"]


METHODS: tuple[str, ...] = ("uniform", "lloydmax", "lambda", "lambda-lloyd")


MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class Codebook:
    """K sorted centers and K−1 sorted boundaries, in normalised (σ) units."""

    centers: np.ndarray
    boundaries: np.ndarray

    def __post_init__(self) -> None:
        c, b = np.asarray(self.centers, np.float64), np.asarray(self.boundaries, np.float64)
        if c.ndim != 1 or len(c) < 2 or b.shape != (len(c) - 1,):
            raise ValueError(f"need K >= 2 centers and K-1 boundaries, got {c.shape} and {b.shape}")
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(b))):
            raise ValueError("codebook centers and boundaries must be finite")
        if np.any(np.diff(b) < 0):
            raise ValueError("codebook boundaries must be sorted")
        object.__setattr__(self, "centers", c)
        object.__setattr__(self, "boundaries", b)

    @property
    def levels(self) -> int:
        return len(self.centers)

    @classmethod
    def nearest(cls, centers: np.ndarray) -> "Codebook":
        """Nearest-centre codebook: boundaries at the midpoints of sorted centers."""
        c = np.sort(np.asarray(centers, np.float64))
        return cls(c, 0.5 * (c[1:] + c[:-1]))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes ``#{boundaries ≤ x}`` (numpy reference of :func:`quantize`)."""
        return np.searchsorted(self.boundaries, x, side="right")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.centers[codes]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(x))


def levels_for_bits(bits: int) -> int:
    """K = 2^bits, with bits validated to [1, 8]."""
    if int(bits) != bits or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return 2 ** int(bits)


def compand(density: dens.GridDensity, levels: int) -> Codebook:
    """Centers at the quantiles ``F⁻¹((i − ½)/K)`` of a point density, midpoint boundaries."""
    p = (np.arange(levels) + 0.5) / levels
    return Codebook.nearest(density.ppf(p))


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown codebook method {method!r}; choose one of {', '.join(METHODS)}")


def quantize(x: torch.Tensor, boundaries: torch.Tensor, dim: int) -> torch.Tensor:
    """Integer codes of ``x`` with one codebook per index of ``dim``.

    ``x``: any shape, already normalised (σ units); ``boundaries``: ``(H, K−1)`` sorted, with
    ``H = x.shape[dim]``. Returns uint8 codes of ``x``'s shape, ``code = #{boundaries ≤ x}``.
    Raises on NaN/inf input rather than mapping it to an arbitrary code.
    """
    if boundaries.ndim != 2 or boundaries.shape[0] != x.shape[dim]:
        raise ValueError(f"boundaries must be (H={x.shape[dim]}, K-1), got {tuple(boundaries.shape)}")
    if boundaries.shape[1] + 1 > 256:
        raise ValueError("at most 256 levels (8 bits) per codebook")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize NaN or infinite values")
    xh = x.movedim(dim, 0)
    shape = xh.shape
    flat = xh.reshape(shape[0], -1).to(boundaries.dtype).contiguous()
    codes = torch.searchsorted(boundaries.contiguous(), flat, right=True)
    return codes.to(torch.uint8).reshape(shape).movedim(0, dim)


def dequantize(codes: torch.Tensor, centers: torch.Tensor, dim: int) -> torch.Tensor:
    """Centers selected by ``codes``; ``centers``: ``(H, K)``, H along ``dim`` of ``codes``."""
    if centers.ndim != 2 or centers.shape[0] != codes.shape[dim]:
        raise ValueError(f"centers must be (H={codes.shape[dim]}, K), got {tuple(centers.shape)}")
    ch = codes.movedim(dim, 0)
    shape = ch.shape
    out = torch.gather(centers, 1, ch.reshape(shape[0], -1).long())
    return out.reshape(shape).movedim(0, dim)


def fake_quantize(x: torch.Tensor, centers: torch.Tensor, boundaries: torch.Tensor, dim: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype."""
    return dequantize(quantize(x, boundaries, dim), centers, dim).to(x.dtype)
