"""Undo and redo rotary position embeddings, for quantizing queries and keys *pre*-RoPE (torch only).

transformers' rotary models (Llama, Qwen2, Mistral, Gemma3, GPT-NeoX, …) rotate the first
``r = cos.shape[-1]`` dims of a head (all of them, or a fraction for GPT-NeoX) as pairs
``(j, j + r/2)``: ``x_rot = x·cos + rotate_half(x)·sin`` with ``cos = a·cos(pθ)``, ``sin = a·sin(pθ)``
per position p (``a`` = the rotary ``attention_scaling``, 1 for plain RoPE). The inverse is the
rotation by ``−pθ`` divided by ``a²``: ``x = (x_rot·cos − rotate_half(x_rot)·sin) / (cos² + sin²)``.

Pre-RoPE, a channel's value does not spin with the position, so the per-channel statistics and
ranges that scales and codebooks are fitted to are those of the projection itself (the outlier
channels of keys stay put). ``x̂ = rotate(Q(derotate(x)))``.

Gradients: RoPE is the linear map ``A x = x·cos + rotate_half(x)·sin``, so a gradient ``g`` with
respect to the rotated entries is ``Aᵀ g = g·cos − rotate_half(g)·sin`` with respect to the
pre-RoPE ones (:func:`pullback`; cos and sin are the same on both halves of a pair).
"""

from __future__ import annotations

from typing import Literal

import torch

#: The frame in which queries and keys are quantized: after the rotary embedding (``post``) or
#: before it (``pre``: the rotation undone, the entries quantized, rotated back).
Rope = Literal["post", "pre"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(x_rot, x_pass, cos, sin)`` with cos/sin (B|1, T, r) broadcast to x (B, H, T, D)."""
    r = cos.shape[-1]
    if cos.shape[-2] != x.shape[-2] or r > x.shape[-1] or r % 2:
        raise ValueError(
            f"rotary tables {tuple(cos.shape)} do not match a tensor of {x.shape[-2]} positions × {x.shape[-1]} dims"
        )
    return x[..., :r].float(), x[..., r:], cos.unsqueeze(1).float(), sin.unsqueeze(1).float()


def derotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse RoPE of ``x`` (B, H, T, D) with the tables (B|1, T, r) that rotated it; float32."""
    xr, xp, c, s = _split(x, cos, sin)
    return torch.cat(((xr * c - _rotate_half(xr) * s) / (c * c + s * s), xp.float()), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` (B, H, T, D) as transformers applies it; float32."""
    xr, xp, c, s = _split(x, cos, sin)
    return torch.cat((xr * c + _rotate_half(xr) * s, xp.float()), dim=-1)


def pullback(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the pre-RoPE entries from ``g`` (B, H, T, D) w.r.t. the rotated ones; float32."""
    gr, gp, c, s = _split(g, cos, sin)
    return torch.cat((gr * c - _rotate_half(gr) * s, gp.float()), dim=-1)
