"""Prefill attention with ``Q·Kᵀ`` from INT8 codes (``kvquant.wrap(model, prefill="int8")``).

A call of the attention function is a prefill when its T queries and T keys are the same
positions (no past tokens) and T > 1; there, with ``Controller.prefill == "int8"`` and the model's
entries unquantized (mode ``off``), attention runs :func:`kvquant.kernels.prefill_cpu.prefill_attention`:
queries and keys — the keys less their mean, each channel's range balanced between the two sides —
as INT8 per token, integer dot products, softmax and ``P·V`` in float32 from bf16 probabilities and
values (the math is documented there). Decoding steps and calls with a past run as before (SDPA,
or the KV cache's own kernel).

The kernel knows the causal pattern and a sliding window (``sliding_window`` as transformers passes
it); a mask with anything else in it (padding) is attended by SDPA instead, with a warning once per
model, and so are tensors off the CPU.
"""

from __future__ import annotations

import warnings

import torch

from kvquant.kernels import prefill_cpu

PREFILLS = ("sdpa", "int8")


def check_prefill(prefill: str) -> str:
    """``prefill`` if it is one of :data:`PREFILLS` and runs here (``"int8"``: the kernel builds), else
    ValueError / RuntimeError saying why."""
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    if prefill == "int8":
        ok, why = prefill_cpu.available()
        if not ok:
            raise RuntimeError(f"prefill='int8' needs the CPU prefill kernel: {why}")
    return prefill


def _pattern(t: int, window: int) -> torch.Tensor:
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= i) & (j > i - window) if window > 0 else j <= i


def int8_prefill(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, softcap: float | None = None,
                 sliding_window: int | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None] | None:
    """``(B, T, H, D)`` attention output of one prefill call from INT8 codes, or None where this call
    is not one the kernel runs (a decoding step, a past, a mask other than causal / sliding window,
    tensors off the CPU). Raises for what it cannot honour: dropout, a logit softcap."""
    t = query.shape[2]
    if t < 2 or key.shape[2] != t:
        return None
    if dropout or module.training:
        raise ValueError("prefill='int8' is an inference path: no dropout, no training (model.eval())")
    if softcap:
        raise NotImplementedError("prefill='int8' has no attention logit softcap; use prefill='sdpa' for this model")
    window = int(sliding_window or 0)
    plain = query.is_cpu and (attention_mask is None or (
        attention_mask.dtype == torch.bool and attention_mask.shape[-2:] == (t, t)
        and bool((attention_mask.cpu() == _pattern(t, window)).all())
    ))
    if not plain:
        ctl = module.kvquant
        if not ctl.prefill_warned:
            ctl.prefill_warned = True
            why = f"tensors on {query.device}" if not query.is_cpu else "a mask with padding"
            warnings.warn(f"prefill='int8' runs causal and sliding-window prefills on the CPU; {why} is attended by "
                          "SDPA instead (this warning is shown once per model)", stacklevel=2)
        return None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = prefill_cpu.prefill_attention(query, key, value, scale, window)
    return out.transpose(1, 2).contiguous().to(query.dtype), None
