"""Symmetric INT8 per row: the KV cache's newest incomplete group (``tail="int8"``,
:class:`kvquant.cache.store.KVStore`) and the prefill attention on codes (:mod:`kvquant.hf.prefill`)
hold their rows so (torch only).

A row x (the last dimension, D entries) is held as ``codes = round(x / s)`` in [−127, 127] with
``s = max|x| / 127`` stored in fp16 (clamped to fp16's positive range), 8 + 16/D bits per entry;
it reads back as ``codes · s``. The division runs in float32 on the fp16 scale, so the codes are
those of the stored scale.
"""

from __future__ import annotations

import torch

__all__ = ["ROW_SCALE_DTYPE", "decode_int8_rows", "encode_int8_rows"]

#: dtype of the per-row scale (16 bits, counted in the memory).
ROW_SCALE_DTYPE = torch.float16
ROW_SCALE_MIN, ROW_SCALE_MAX = 2.0**-24, 65504.0


def encode_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of ``x`` (…, D): int8 (…, D) and fp16 (…)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).div_(127).clamp_(ROW_SCALE_MIN, ROW_SCALE_MAX).to(ROW_SCALE_DTYPE)
    return xf.div(scale).round_().clamp_(-127, 127).to(torch.int8), scale.squeeze(-1)


def decode_int8_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What :func:`encode_int8_rows` holds, ``codes · scale`` in ``dtype``."""
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)
