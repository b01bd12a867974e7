"""Attention-logit error per head: how far ``Q̂K̂ᵀ`` is from ``QKᵀ`` over the allowed pairs.

For layer l, query head h: ``err = ‖(Q̂K̂ᵀ − QKᵀ) ⊙ M‖_F / ‖QKᵀ ⊙ M‖_F`` summed over all
windows (M = allowed pairs: causal, window, padding). Scaling by 1/√d cancels. This is the
metric of the seed paper's LLM experiment.

The logits are always the post-RoPE ones the model attends with; each quantizer is applied
where kvquant's attention function applies it in quantize mode
(:func:`kvquant.hf.attention.quantize_qk`): after the rotary embedding, or before it (``rope =
"pre"``: rotation undone, entries quantized, rotated back), on its ``sides`` only, and — for a
quantizer with ``key_group`` G > 0, such as the deployed KV cache's codebooks — with each key
read quantized only by the queries after its group of G is complete
(:func:`kvquant.hf.attention.keys_read_quantized`): the logits of a query with a key of the newest
incomplete group are exact, as decoding through the cache reads them.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from kvquant.hf.attention import Quantizer, key_group, keys_read_quantized, quantize_qk
from kvquant.hf.calibrate import run_capture
from kvquant.hf.wrap import attention_modules
from kvquant.io.fingerprint import ModelFingerprint


class QueryKeyPair:
    """Queries through ``queries``, keys through ``keys`` (either None: exact), in the one frame both
    quantizers name (``rope``), keys read quantized only once their group of ``key_group`` tokens is
    complete (default: the key quantizer's own, e.g. :attr:`kvquant.codebooks.Codebooks.key_group`;
    give a per-token baseline the codebooks' G to quantize the same keys). A deployable ``Q̂·K̂ᵀ``
    is a causal query rule beside the cache's keys. Works with :func:`logit_errors` and, as any
    quantizer, with :func:`kvquant.wrap`; ``effective_bits`` is the mean of the quantized sides'."""

    def __init__(self, queries: Quantizer | None, keys: Quantizer | None, key_group: int | None = None):
        used = {s: x for s, x in (("q", queries), ("k", keys)) if x is not None}
        frames = {getattr(x, "rope", "post") for x in used.values()}
        if len(frames) > 1:
            raise ValueError(f"the query and key quantizers work in different frames ({sorted(frames)}): "
                             "give both the same rope")
        self.queries, self.keys, self.sides = queries, keys, tuple(used)
        self.rope = frames.pop() if frames else "post"
        default = getattr(keys, "key_group", 0) if keys is not None else 0
        self.key_group = int(default if key_group is None else key_group)

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        quant = self.queries if side == "q" else self.keys
        return x if quant is None else quant(x, layer, side)

    def effective_bits(self, head_dim: int | None = None, seqlen: int | None = None) -> float:
        bits = [float(x.effective_bits(head_dim=head_dim, seqlen=seqlen)) for x in (self.queries, self.keys)
                if x is not None]
        return sum(bits) / len(bits) if bits else 0.0


class KeysOnly(QueryKeyPair):
    """``quantizer`` on the keys only, queries exact (``sides = ("k",)``): the deployed KV cache's
    quantizer beside exact queries; ``effective_bits`` is the quantizer's own (for keys-only
    codebooks, ``budget_sides`` k: per key entry)."""

    def __init__(self, quantizer: Quantizer, key_group: int | None = None):
        super().__init__(None, quantizer, key_group)
        self.quantizer = quantizer


@torch.no_grad()
def logit_errors(model: torch.nn.Module, windows, quantizers: dict[str, Quantizer], progress: bool = True) -> dict[str, torch.Tensor]:
    """Relative Frobenius error (L, H) of the post-RoPE attention logits for every named quantizer,
    each applied as the attention function applies it: in its frame (attribute ``rope``, ``"post"``
    if absent; ``"pre"`` needs a rotary model), on its ``sides`` (default both) and block-causally
    for a ``key_group`` > 0 (module docstring). ``windows``: (n, seqlen) token ids or Windows."""
    ids = getattr(windows, "ids", windows)
    fp = ModelFingerprint.from_model(model)
    g = fp.num_heads // fp.num_kv_heads
    modules = {m.layer_idx: m for m in attention_modules(model)}  # carry the rotary tables of the call
    num = {name: torch.zeros(fp.num_layers, fp.num_heads, dtype=torch.float64) for name in quantizers}
    den = torch.zeros(fp.num_layers, fp.num_heads, dtype=torch.float64)

    def observe(layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        masks = {0: mask.to(torch.float32)}  # by key group: the pairs whose logit can change
        s = q.float() @ repeat_kv(k, g).float().transpose(-1, -2)
        den[layer] += (s * masks[0]).pow_(2).sum(dim=(0, 2, 3)).double().cpu()
        for name, quant in quantizers.items():
            q_hat, k_hat = quantize_qk(modules[layer], quant, getattr(quant, "rope", "post"), q, k)
            if q_hat is q:  # queries exact: the error is q·(k̂ − k)ᵀ, without cancellation
                err = q.float() @ repeat_kv(k_hat.float() - k.float(), g).transpose(-1, -2)
            else:
                err = (q_hat.float() @ repeat_kv(k_hat, g).float().transpose(-1, -2)).sub_(s)
            group = key_group(quant) if k.shape[2] == q.shape[2] else 0
            if group not in masks:
                masks[group] = masks[0] * keys_read_quantized(q.shape[2], group, q.device)
            num[name][layer] += err.mul_(masks[group]).pow_(2).sum(dim=(0, 2, 3)).double().cpu()

    run_capture(model, ids, observe, progress=progress, desc="logit error")
    return {name: (n / den.clamp_min(1e-300)).sqrt() for name, n in num.items()}
