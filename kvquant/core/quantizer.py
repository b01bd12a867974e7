"""The channel-group quantizer that every path runs: the simulated attention path
(:meth:`kvquant.codebooks.SideBooks.apply`) and the KV cache (:mod:`kvquant.cache`) call these
functions, so that what a cache stores is what a simulation measured (torch only).

One layer and side (queries or keys), x (B, H, T, D), groups of G consecutive tokens:

1. **Range** per (channel, group): ``mid = (max+min)/2``, ``half = (max−min)/2``
   (:func:`kvquant.core.groupnorm.group_range`), stored in ``scale_bits`` — fp16, or the 8-bit format
   of :func:`kvquant.core.groupnorm.store_scales` — and read back from that stored form.
2. **Codes** of ``x̃ = (x − mid)/half`` with the layer's tables: one codebook per head
   (boundaries (H, K−1)) or, with bit allocation, one per channel (H, D, K−1), a channel with n
   levels having +inf padding past its n−1 boundaries: ``code = #{boundaries ≤ x̃}``
   (:func:`channel_codes`).
3. **Values** ``x̂ = centers[code] · half + mid`` (:func:`channel_values`, :func:`decode_groups`).

``SideBooks.apply`` quantizes whole groups with these two functions (after
:func:`kvquant.core.groupnorm.causal_groups`), so the simulated keys and the cache's are the same
bits, with fp16 or 8-bit scales (tests/test_quantizer.py, tests/test_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant.core import scalar as cb
from kvquant.core.groupnorm import (
    check_finite,
    group_range,
    group_restore,
    load_scales,
    scaled,
    store_scales,
)

__all__ = ["GroupCodes", "channel_codes", "channel_values", "decode_groups", "encode_groups"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) → (H·D, B·T): one row per (head, channel)."""
    b, h, t, d = x.shape
    return x.permute(1, 3, 0, 2).reshape(h * d, b * t)


def _unrows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, h, t, d = shape
    return rows.reshape(h, d, b, t).permute(2, 0, 3, 1)


def channel_codes(xt: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """uint8 codes of normalised ``xt`` (B, H, T, D) with one layer's ``boundaries``: per head
    (H, K−1) or per channel (H, D, K−1)."""
    if boundaries.ndim == 2:
        return cb.quantize(xt, boundaries, dim=1)
    return _unrows(cb.quantize(_rows(xt), boundaries.reshape(-1, boundaries.shape[-1]), dim=0), xt.shape)


def channel_values(codes: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Centers (float32) selected by ``codes`` (B, H, T, D) from one layer's ``centers``: per
    head (H, K) or per channel (H, D, K)."""
    if centers.ndim == 2:
        return cb.dequantize(codes, centers.float(), dim=1)
    return _unrows(cb.dequantize(_rows(codes), centers.float().reshape(-1, centers.shape[-1]), dim=0), codes.shape)


@dataclass
class GroupCodes:
    """Whole groups of one layer and side as stored: ``codes`` uint8 (B, H, n·G, D), ``mid`` and
    ``half`` (B, H, n, D) in their stored dtype (fp16, or int8 codes for ``scale_bits`` 8)."""

    codes: torch.Tensor
    mid: torch.Tensor
    half: torch.Tensor
    scale_bits: int


def encode_groups(x: torch.Tensor, group: int, scale_bits: int, boundaries: torch.Tensor) -> GroupCodes:
    """Quantize x (B, H, n·G, D), a whole number of groups of ``group`` tokens (ValueError on
    NaN/inf or a partial group)."""
    if x.shape[2] % group:
        raise ValueError(f"encode_groups takes whole groups of {group} tokens, got {x.shape[2]}")
    check_finite(x)
    xg, mid, half = group_range(x, group)
    mid_s, half_s = store_scales(mid, half, scale_bits)
    xt = scaled(xg, *load_scales(mid_s, half_s, scale_bits)).reshape(x.shape)
    return GroupCodes(channel_codes(xt, boundaries), mid_s.squeeze(3), half_s.squeeze(3), scale_bits)


def decode_groups(q: GroupCodes, centers: torch.Tensor, group: int) -> torch.Tensor:
    """x̂ (B, H, n·G, D) float32 of :func:`encode_groups`' output."""
    mid, half = load_scales(q.mid.unsqueeze(3), q.half.unsqueeze(3), q.scale_bits)
    return group_restore(channel_values(q.codes, centers), mid, half, group)
