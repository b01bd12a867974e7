"""Attention-logit error per head: how far ``Q̂K̂ᵀ`` is from ``QKᵀ`` over the allowed pairs.

For layer l, query head h: ``err = ‖(Q̂K̂ᵀ − QKᵀ) ⊙ M‖_F / ‖QKᵀ ⊙ M‖_F`` summed over all
calibration windows (M = allowed pairs: causal, window, padding). Scaling by 1/√d cancels.
This is the metric of the seed paper's LLM experiment.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from kvquant.attention import Quantizer
from kvquant.calibrate import run_capture
from kvquant.fingerprint import ModelFingerprint


@torch.no_grad()
def logit_errors(model: torch.nn.Module, windows, quantizers: dict[str, Quantizer], progress: bool = True) -> dict[str, torch.Tensor]:
    """Relative Frobenius error (L, H) of the attention logits for every named quantizer."""
    pre = [name for name, quant in quantizers.items() if getattr(quant, "rope", "post") != "post"]
    if pre:
        raise ValueError(f"logit errors are measured on post-RoPE quantizers only; {pre} quantize pre-RoPE")
    ids = getattr(windows, "ids", windows)
    fp = ModelFingerprint.from_model(model)
    g = fp.num_heads // fp.num_kv_heads
    num = {name: torch.zeros(fp.num_layers, fp.num_heads, dtype=torch.float64) for name in quantizers}
    den = torch.zeros(fp.num_layers, fp.num_heads, dtype=torch.float64)

    def observe(layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(torch.float32)
        s = q.float() @ repeat_kv(k, g).float().transpose(-1, -2)
        den[layer] += ((s * m) ** 2).sum(dim=(0, 2, 3)).double().cpu()
        for name, quant in quantizers.items():
            s_hat = quant(q, layer, "q").float() @ repeat_kv(quant(k, layer, "k"), g).float().transpose(-1, -2)
            num[name][layer] += (((s_hat - s) * m) ** 2).sum(dim=(0, 2, 3)).double().cpu()

    run_capture(model, ids, observe, progress=progress, desc="logit error")
    return {name: (n / den.clamp_min(1e-300)).sqrt() for name, n in num.items()}
