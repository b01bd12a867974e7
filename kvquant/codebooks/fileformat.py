"""The codebook file: a safetensors file whose metadata records the format, the configuration,
the calibration and the model fingerprint; :func:`file_problem` checks a loaded file's tensors."""

from __future__ import annotations

import math
from dataclasses import fields

import torch

from kvquant.codebooks.config import CodebookConfig
from kvquant.core import scalar as cb
from kvquant.core.stats import PairStats
from kvquant.io.fingerprint import ModelFingerprint

#: What a codebook file's calibration record must hold: the text, window count and length it was
#: calibrated on (held-out checks and METHOD@B budgets read them; token ranges are optional).
CALIBRATION_RECORD = ("source", "windows", "seqlen")


def file_problem(t: dict[str, torch.Tensor], config: CodebookConfig, fp: ModelFingerprint) -> str | None:
    """The first thing wrong with the tensors ``t`` of a codebook file for its own ``config`` and
    ``fp`` (model geometry), or None. Per side (``q``: H = heads, ``k``: H = KV heads; L layers,
    D = head_dim): ``centers`` float32 (L, H, K) or (L, H, D, K), K a power of two ≤ 2^8, finite and
    non-decreasing; ``boundaries`` float32, K−1 in the last axis, non-decreasing, no NaN (+inf pads
    a channel's unused levels); ``offset``/``scale`` float32 (L, H, D), finite, scale > 0;
    ``channel_levels`` (allocated files) int16 (L, H, D) in 2..K (queries 1..K); ``token_range``
    (allocated ``channel-token`` queries) float32 (L, H) > 0; ``basis`` / ``basis_sd`` (transform-coded
    queries, together) float32 (L, H, D, D) with orthonormal columns / (L, H, D) > 0.
    ``stats.*``: (L, H, D) floats."""
    L, D = fp.num_layers, fp.head_dim
    for side, H in (("q", fp.num_heads), ("k", fp.num_kv_heads)):
        for name in ("centers", "boundaries", "offset", "scale"):
            if f"{side}.{name}" not in t:
                return f"tensor {side}.{name} is missing"
        c, b, off, sc = (t[f"{side}.{n}"] for n in ("centers", "boundaries", "offset", "scale"))
        for name, x in (("centers", c), ("boundaries", b), ("offset", off), ("scale", sc)):
            if x.dtype != torch.float32:
                return f"{side}.{name} is {str(x.dtype).removeprefix('torch.')}, not float32"
        K = c.shape[-1]
        if c.shape[:3] != (L, H, c.shape[2]) or c.ndim not in (3, 4) or (c.ndim == 4 and c.shape[2] != D):
            return f"{side}.centers has shape {tuple(c.shape)}, expected ({L}, {H}[, {D}], K) for this model"
        if K < 2 or K & (K - 1) or K > 2**cb.MAX_BITS:
            return f"{side}.centers has {K} levels, not a power of two in 2..{2**cb.MAX_BITS}"
        if tuple(b.shape) != (*c.shape[:-1], K - 1):
            return f"{side}.boundaries has shape {tuple(b.shape)}, expected {(*c.shape[:-1], K - 1)}"
        for name, x in (("offset", off), ("scale", sc)):
            if tuple(x.shape) != (L, H, D):
                return f"{side}.{name} has shape {tuple(x.shape)}, expected {(L, H, D)}"
            if not torch.isfinite(x).all():
                return f"{side}.{name} holds NaN/inf"
        if not (sc > 0).all():
            return f"{side}.scale holds values <= 0"
        if not torch.isfinite(c).all() or (c.diff(dim=-1) < 0).any():
            return f"{side}.centers are not finite and sorted"
        if b.isnan().any() or (b == -math.inf).any() or (b.diff(dim=-1) < 0).any():
            return f"{side}.boundaries are not sorted (or hold NaN / -inf)"
        levels = t.get(f"{side}.channel_levels")
        if levels is not None:
            if levels.dtype != torch.int16 or tuple(levels.shape) != (L, H, D):
                return (f"{side}.channel_levels is {str(levels.dtype).removeprefix('torch.')} {tuple(levels.shape)}, "
                        f"expected int16 {(L, H, D)}")
            low = 1 if side == "q" else 2  # a query component may be dropped (0 bits); key codes are packed
            if (levels < low).any() or (levels > K).any():
                return f"{side}.channel_levels outside {low}..{K}"
        elif c.ndim == 4:
            return f"{side}.channel_levels is missing (the centers are per channel)"
        token_range = t.get(f"{side}.token_range")
        if token_range is not None and (token_range.dtype != torch.float32 or tuple(token_range.shape) != (L, H)
                                        or not (token_range > 0).all() or not torch.isfinite(token_range).all()):
            return f"{side}.token_range is not float32 ({L}, {H}), finite and > 0"
        problem = basis_problem(t.get(f"{side}.basis"), t.get(f"{side}.basis_sd"), (L, H, D))
        if problem:
            return f"{side}.{problem}"
    for k in (f"stats.{f.name}" for f in fields(PairStats)):
        if k not in t:
            return f"tensor {k} (calibration statistics) is missing"
        if not t[k].is_floating_point() or tuple(t[k].shape) != (L, fp.num_heads, D):
            return f"{k} is {str(t[k].dtype).removeprefix('torch.')} {tuple(t[k].shape)}, expected floats {(L, fp.num_heads, D)}"
    return None


def basis_problem(basis: torch.Tensor | None, sd: torch.Tensor | None, shape: tuple[int, int, int]) -> str | None:
    """What is wrong with a side's transform (``basis`` (L, H, D, D) with orthonormal columns,
    ``basis_sd`` (L, H, D) > 0, both float32, both or neither), or None."""
    if basis is None and sd is None:
        return None
    if basis is None or sd is None:
        return "basis and basis_sd: one is missing"
    L, H, D = shape
    if basis.dtype != torch.float32 or tuple(basis.shape) != (L, H, D, D) or not torch.isfinite(basis).all():
        return f"basis is not float32 ({L}, {H}, {D}, {D}) and finite"
    if sd.dtype != torch.float32 or tuple(sd.shape) != (L, H, D) or not torch.isfinite(sd).all() or not (sd > 0).all():
        return f"basis_sd is not float32 ({L}, {H}, {D}), finite and > 0"
    eye = torch.eye(D, dtype=torch.float64)
    if (basis.double().transpose(-1, -2) @ basis.double() - eye).abs().amax() > 1e-4:
        return "basis columns are not orthonormal"
    return None
