"""Dequantizing the static-normalisation layout of :class:`kvquant.cache.KVQuantCache` (pure torch).

Layout (what a layer holds with ``norm`` ``head``/``channel`` keys):

``k_codes``   uint8 ``(B, H_kv, S, packed_size(D, bits_k))``: each token's key codes packed along
              head_dim with :func:`kvquant.core.packing.pack_codes` (4 bits: byte ``j`` holds channel
              ``2j`` in its low nibble and ``2j+1`` in its high nibble).
``k_centers`` ``(H_kv, K)`` codebook centers in normalised units; ``k_offset``, ``k_scale``
              ``(H_kv, D)``: ``k̂[s, j] = k_centers[code] · k_scale[j] + k_offset[j]``.
``v_codes``   uint8 ``(B, H_kv, S, packed_size(D, bits_v))``; ``v_centers`` ``(K_v,)`` (one table
              for every head) or ``(H_kv, K_v)``; ``v_scale`` ``(B, H_kv, S)`` (fp16, one per
              token and head): ``v̂[s, j] = v_centers[code] · v_scale[s]``.

The deployed ``channel-group`` layout is read directly from its codes by
:mod:`kvquant.kernels.dispatch` (CPU) and :mod:`kvquant.kernels.triton_decode` (GPU).

``pack``/``unpack`` are :func:`kvquant.core.packing.pack_codes`/:func:`~kvquant.core.packing.unpack_codes`
(the same byte layout; fast for bits dividing 8).
"""

from __future__ import annotations

import torch

from kvquant.core.packing import pack_codes as pack
from kvquant.core.packing import unpack_codes as unpack

__all__ = [
    "pack",
    "unpack",
    "lookup",
    "dequantize_keys",
    "dequantize_values",
]


def lookup(codes: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``centers[h, codes[:, h]]`` for codes ``(B, H, …)`` and centers ``(H, K)`` (or ``(K,)``,
    shared by all heads). Returns centers' dtype, codes' shape."""
    if centers.ndim == 1:
        return centers[codes.long()]
    h, k = centers.shape
    if codes.shape[1] != h:
        raise ValueError(f"codes have {codes.shape[1]} heads, centers {h}")
    base = (torch.arange(h, device=codes.device, dtype=torch.int32) * k).view(1, h, *([1] * (codes.ndim - 2)))
    idx = codes.to(torch.int32) + base
    return centers.reshape(-1).index_select(0, idx.reshape(-1)).reshape(codes.shape)


def dequantize_keys(
    k_codes: torch.Tensor, k_centers: torch.Tensor, k_offset: torch.Tensor, k_scale: torch.Tensor, bits: int,
    head_dim: int | None = None,
) -> torch.Tensor:
    """Float32 keys ``(B, H_kv, S, D)``: ``center · scale + offset`` (the same two float32 ops, in
    the same order, as :meth:`kvquant.codebooks.SideBooks.apply`, so results are bit-identical)."""
    d = head_dim if head_dim is not None else k_offset.shape[-1]
    c = lookup(unpack(k_codes, bits, d), k_centers.float())
    return c * k_scale.float()[None, :, None, :] + k_offset.float()[None, :, None, :]


def dequantize_values(
    v_codes: torch.Tensor, v_centers: torch.Tensor, v_scale: torch.Tensor, bits: int, head_dim: int
) -> torch.Tensor:
    """Float32 values ``(B, H_kv, S, D)``: ``center · per-token scale``."""
    c = lookup(unpack(v_codes, bits, head_dim), v_centers.float())
    return c * v_scale.float().unsqueeze(-1)
