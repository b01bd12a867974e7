"""The orthonormal Hadamard matrix: a rotation of head_dim that spreads a few large channels over
all of them (QuaRot, SpinQuant), so that a per-token min–max range is set by the row's norm rather
than by its largest channel. Pure torch."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def hadamard(n: int) -> torch.Tensor:
    """``H`` (n, n) float32 with ``H Hᵀ = I``: Sylvester's ±1 matrix over √n (symmetric, so ``H⁻¹ = H``);
    ValueError unless n is a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    return _sylvester(n).clone()
