"""Decode attention straight from a quantized KV cache's codes (pure-torch reference).

Layout (what :class:`kvquant.cache.KVQuantCache` holds per layer):

``k_codes``   uint8 ``(B, H_kv, S, packed_size(D, bits_k))``: each token's key codes packed along
              head_dim with :func:`kvquant.packing.pack_codes` (4 bits: byte ``j`` holds channel
              ``2j`` in its low nibble and ``2j+1`` in its high nibble).
``k_centers`` ``(H_kv, K)`` codebook centers in normalised units; ``k_offset``, ``k_scale``
              ``(H_kv, D)``: ``k̂[s, j] = k_centers[code] · k_scale[j] + k_offset[j]``.
``v_codes``   uint8 ``(B, H_kv, S, packed_size(D, bits_v))``; ``v_centers`` ``(K_v,)`` (one table
              for every head) or ``(H_kv, K_v)``; ``v_scale`` ``(B, H_kv, S)`` (fp16, one per
              token and head): ``v̂[s, j] = v_centers[code] · v_scale[s]``.

:func:`decode_attention_reference` computes ``softmax(q·K̂ᵀ·scaling)·V̂`` for ``Tq`` query tokens
(the last ``Tq`` positions of the sequence, causal among themselves) with GQA (query head ``h``
reads KV head ``h // (H / H_kv)``). It is the correctness reference for the Triton kernel in
:mod:`kvquant.triton_decode`.

``pack``/``unpack`` are :func:`kvquant.packing.pack_codes`/:func:`~kvquant.packing.unpack_codes`
(the same byte layout; fast for bits dividing 8).
"""

from __future__ import annotations

import torch

from kvquant.packing import pack_codes as pack
from kvquant.packing import unpack_codes as unpack

__all__ = [
    "pack",
    "unpack",
    "lookup",
    "dequantize_keys",
    "dequantize_values",
    "decode_attention_reference",
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


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def decode_attention_reference(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_centers: torch.Tensor,
    k_offset: torch.Tensor,
    k_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_centers: torch.Tensor,
    v_scale: torch.Tensor,
    bits: int,
    scaling: float | None = None,
    *,
    bits_v: int | None = None,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q·K̂ᵀ·scaling)·V̂`` from packed codes, pure torch; returns ``(B, H, Tq, D)`` in q's dtype.

    ``q``: ``(B, H, Tq, D)``, the queries of the last ``Tq`` positions; ``bits``: key bits
    (``bits_v`` defaults to it); ``scaling`` defaults to ``D**-0.5``. With ``causal`` query ``t``
    sees keys ``s ≤ S − Tq + t``. ``attention_mask``: optional bool ``(B|1, 1|H, Tq, S)``,
    True = attend (e.g. left padding); a query row with no allowed key returns zeros.
    Math in float32: unpack, gather, then the same steps as SDPA.
    """
    b, h, tq, d = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    bits_v = bits if bits_v is None else bits_v
    scaling = d**-0.5 if scaling is None else float(scaling)
    k = _repeat_kv(dequantize_keys(k_codes, k_centers, k_offset, k_scale, bits, d), h // hkv)
    v = _repeat_kv(dequantize_values(v_codes, v_centers, v_scale, bits_v, d), h // hkv)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling  # (B, H, Tq, S)
    allowed = torch.ones(1, 1, tq, s, dtype=torch.bool, device=q.device)
    if causal and tq > 1:
        t = torch.arange(tq, device=q.device)[:, None] + (s - tq)
        allowed = allowed & (torch.arange(s, device=q.device)[None, :] <= t)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0, not NaN
    return torch.matmul(probs, v).to(q.dtype)
