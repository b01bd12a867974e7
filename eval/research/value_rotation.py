"""Exploratory: do values quantize better per token after a Hadamard rotation of head_dim?

The cache quantizes each token's value row (head_dim entries of one KV head) as asymmetric INT
with 8-bit (mid, half) — ``encode_groups`` along head_dim, the cache's own function. A value row
is a few large channels and many small ones, so the min–max range, and with it the step, is set by
the outliers. Rotating the row by an orthonormal Hadamard matrix H first (``v' = v H``; QuaRot's
move) spreads the outliers over every channel; the attention output is rotated back after the
softmax-weighted sum, ``o = (P V') Hᵀ = P V``, exactly, so nothing else changes.

Simulated in one forward pass per window: every value row quantized as ``v_proj`` emits it (a
forward hook), keys and queries exact — the error of the value quantizer alone (in the cache the
newest incomplete group's values are INT8, so this is the quantizer's cost, not the cache's).
KL divergence from the unquantized model on the development windows (5–6; calibration windows are
the file's).

Rows: ``V{b}`` the cache's minmax values, `` H`` rotated first, `` rms`` the cache's ``rms`` values instead.

Usage:  python eval/research/value_rotation.py [--codebooks out/default.safetensors] [--bits 4,3,2]
            [--dtype auto] [--windows 5,6]
"""

from __future__ import annotations

import argparse

import torch

from kvquant.cache.format import value_codebook
from kvquant.codebooks import Codebooks
from kvquant.core.hadamard import hadamard
from kvquant.core.quantizer import decode_groups, encode_groups
from kvquant.evaluation.divergence import Agreement, log_probs
from kvquant.io.assets import load_model
from kvquant.io.data import held_out_windows, load_text


def quantize_rows(v: torch.Tensor, bits: int, rot: torch.Tensor | None, rms: bool = False) -> torch.Tensor:
    """Value rows ``v`` (..., D) through per-row asymmetric INT ``bits`` (uniform levels on
    [mid − half, mid + half], 8-bit mid/half) — or, ``rms``, the cache's ``rms`` values (the row over
    its fp16 RMS through the companded λ*(u; ρ = 0) codebook) —, rotated by ``rot`` first and back after."""
    shape, d = v.shape, v.shape[-1]
    x = v.float().reshape(-1, d)
    if rot is not None:
        x = x @ rot
    if rms:
        book = value_codebook(bits, "rms")
        scale = x.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6).half().float()
        centers = torch.as_tensor(book.centers, dtype=torch.float32)
        bounds = torch.as_tensor(book.boundaries, dtype=torch.float32)
        y = centers[torch.bucketize(x / scale, bounds)] * scale
    else:
        levels = torch.linspace(-1, 1, 2**bits)
        bounds = ((levels[1:] + levels[:-1]) / 2)[None]
        q = encode_groups(x.T[None, None], d, 8, bounds)  # (1, 1, D, rows): one group of D per row
        y = decode_groups(q, levels[None], d)[0, 0].T
    if rot is not None:
        y = y @ rot.T
    return y.reshape(shape).to(v.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", default="out/default.safetensors", help="only for its calibration windows")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--windows", default="5,6", help="1-based window numbers (development: 5,6)")
    args = ap.parse_args()

    books = Codebooks.load(args.codebooks)
    model, tok = load_model(args.model, dtype=args.dtype)
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    picks = [int(w) - 1 for w in args.windows.split(",")]
    wins = held_out_windows(tok, load_text("enwiki-excerpt", split="test"), 2048, max(picks) + 1, books.calibration)
    rot = hadamard(d)
    setting: dict = {"bits": None, "rot": None, "rms": False}

    def hook(_module, _inputs, out):
        if setting["bits"] is None:
            return out
        return quantize_rows(out.unflatten(-1, (-1, d)), setting["bits"], setting["rot"], setting["rms"]).flatten(-2)

    for layer in model.model.layers:
        layer.self_attn.v_proj.register_forward_hook(hook)
    rows = {f"V{b}{' H' if h else ''}{' rms' if r else ''}": (b, h, r) for b in map(int, args.bits.split(","))
            for h in (False, True) for r in (False, True)}
    stats = {name: Agreement() for name in rows}
    with torch.no_grad():
        for i in picks:
            ids = wins.ids[i : i + 1]
            setting.update(bits=None, rot=None, rms=False)
            ref = log_probs(model(ids).logits[0, :-1])
            for name, (b, h, r) in rows.items():
                setting.update(bits=b, rot=rot if h else None, rms=r)
                stats[name].add(ref, model(ids).logits[0, :-1])
    print(f"{args.model}, {model.dtype}, windows {args.windows} × 2048, values only (keys and queries exact)")
    print("| row | KLD | KLD p99 | top-1 |\n|---|---|---|---|")
    for name, s in stats.items():
        kld, p99, top1 = s.summary()
        print(f"| {name} | {kld:.5f} | {p99:.4f} | {top1:.2%} |")


if __name__ == "__main__":
    main()
