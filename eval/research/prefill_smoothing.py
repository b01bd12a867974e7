"""Exploratory: what the int8 prefill's INT8 codes lose, and whether balancing query and key channel
ranges (SmoothQuant's migration, ``q_c / α_c`` and ``α_c · k_c`` leave ``q·k`` unchanged) loses less.

Variants of :func:`kvquant.kernels.prefill_cpu.smoothed_codes` (the kernel is unchanged: they only
change what it is handed), on the development windows 5–6 of ``enwiki-excerpt`` (2048 tokens; the
main job's evaluation windows are 1–4), one forward per window through the kernel, bf16:

* ``keys-mean``: keys less their mean over the prefill's tokens (SageAttention's smoothing), q and k'
  encoded as they are;
* ``balance``: the same, then per KV head and channel ``α_c = sqrt(max|q_c| / max|k'_c|)`` over the
  prefill's tokens and the head's query heads, ``q_c / α_c`` and ``α_c · k'_c`` encoded — the rule
  the library ships since this screen (2026-12-07);
* ``fp32-attention``: no codes, float32 SDPA inside the same layers — how far the float32
  attention alone is from the bf16 SDPA reference (the noise floor of these KLDs).

Usage:  python eval/research/prefill_smoothing.py
"""

from __future__ import annotations

import time
from unittest import mock

import torch
import torch.nn.functional as F

import kvquant
from kvquant.core.int8_rows import encode_int8_rows
from kvquant.evaluation.perplexity import format_table, score_windows
from kvquant.io.assets import load_model
from kvquant.io.data import load_text, make_windows
from kvquant.kernels import prefill_cpu

def keys_mean(q: torch.Tensor, k: torch.Tensor):
    kf = k.float()
    return (*encode_int8_rows(q), *encode_int8_rows(kf - kf.mean(dim=2, keepdim=True)))


def fp32_attention(q, k, v, scale, window=0):
    rep = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(rep, 1) for x in (k, v))
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
    visible = (j <= i) & ((j > i - window) if window > 0 else True)
    return F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=visible, scale=scale)


torch.set_num_threads(2)
model, tok = load_model("smollm2-135m")
text = load_text("enwiki-excerpt", split="test")
dev = make_windows(tok, text, 2048, 6, from_end=False).ids[4:6]


def run(prefill: str, **patch):
    def logits(x: torch.Tensor):
        kvquant.wrap(model, prefill=prefill)
        patch_ = patch or {"smoothed_codes": prefill_cpu.smoothed_codes}  # the shipped rule
        with mock.patch.multiple(prefill_cpu, **patch_), torch.no_grad():
            out = model(x, use_cache=False).logits[0]
        kvquant.unwrap(model)
        yield 0, out

    return logits


t0 = time.time()
scores = score_windows(model, dev, {"fp": run("sdpa"), "keys-mean": run("int8", smoothed_codes=keys_mean),
                                    "balance": run("int8"), "fp32-attention": run("int8", prefill_attention=fp32_attention)})
print(f"development windows 5-6 of 2048 tokens, {next(model.parameters()).dtype}, one forward per window")
print(format_table({n: s.row(n, 16.0 if n == "fp" else 32.0 if n.startswith("fp32") else 8.25)
                    for n, s in scores.items()}))
print("seconds", round(time.time() - t0))
