"""Exploratory: the newest incomplete group held at fewer than 8 bits per entry — what it costs in
quality, and what it would save in mean K/V bits held.

The deployed cache holds the newest group's keys and values as INT8 per token and head (fp16
absmax scale: 8.25 bits at head_dim 64) until the group completes; it adds ~0.35 bits to the mean
bits held over a 2048-token window (BENCHMARKS "Deployed KV cache at 4, 3 and 2 bits held on
average"). Here the same symmetric per-token absmax code is given fewer levels — ``round(x/s)``
with ``s = max|x| / (2^(b−1) − 1)`` — for keys (``kb``) and values (``vb``), through the real
cache in generation mode (the codes still sit in an int8 container: the kernel reads them as it
reads INT8; the group is quantized from them when it completes, as today). Bits are *computed*:
the INT8 cache's measured mean minus what b-bit packed tails would not hold,
``½ (16 − kb − vb) · mean_t((t − C_t)/t)`` (C_t tokens in complete groups after t).

``kbn/vb`` (keys "normalised"): each key channel divided by its calibration RMS (pre-RoPE, equal
over each rotary pair, so it holds after the rotation) before the per-token code and multiplied
back after — the outlier channels no longer set every token's step (rows fake-quantized and held
in a float container; bits counted as for packed b-bit codes).

Rows: development windows 5–6, float32 (this CPU), ``out/default.safetensors``.

Usage:  python eval/research/tail_int_bits.py [--tails 8/8,6/6,5/5,4/4,8/5,5/8,6n/8,5n/8,4n/8] [--key-bits 3.65]
"""
from __future__ import annotations

import argparse
import time

import torch
from dataclasses import replace
from transformers import DynamicCache

import kvquant.cache.store as store
from kvquant.cache import make_cache
from kvquant.cache.format import SCALE_DTYPE
from kvquant.core.int8_rows import ROW_SCALE_MAX, ROW_SCALE_MIN
from kvquant.codebooks import Codebooks
from kvquant.evaluation.generation import evaluate_generation, held_bits
from kvquant.evaluation.perplexity import format_table, make_rows
from kvquant.io.assets import load_model
from kvquant.io.data import held_out_windows, load_text


def _encode(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).div_(qmax).clamp_(ROW_SCALE_MIN, ROW_SCALE_MAX).to(SCALE_DTYPE)
    return xf.div(scale).round_().clamp_(-qmax, qmax).to(torch.int8), scale.squeeze(-1)


_allocate = store.KVStore._allocate


def _patched_allocate(self, *a, **k):
    _allocate(self, *a, **k)
    if getattr(self, "_tail_bits", (8, 8)) != (8, 8):
        self._c_append = False  # the C append writes INT8: the torch path below instead


def _fake(x: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = _encode(x, bits)
    return codes.float() * scale.float().unsqueeze(-1)


def _patched_tails(self, k: torch.Tensor, v: torch.Tensor):
    if hasattr(self, "_tail_norm"):  # keys divided by a static per-channel RMS before the per-token code
        kb, vb, norm = self._tail_norm
        n = norm.to(k.device)[None, :, None, :]
        return (( _fake(k.float() / n, kb) * n).to(k.dtype), None), (_fake(v, vb).to(v.dtype), None)
    kb, vb = getattr(self, "_tail_bits", (8, 8))
    return _encode(k, kb), _encode(v, vb)


def channel_rms(books: Codebooks) -> torch.Tensor:
    """(L, H, D) RMS of each key channel from the calibration's sums (pre-RoPE), made equal over
    each rotary pair (j, j + D/2) — what a post-RoPE key channel's RMS is whatever the position."""
    e2 = (books.stats.skk / books.stats.n.clamp_min(1)).float()  # (L, H_q, D): per query head's pairs
    h = books.k.offset.shape[1]
    e2 = e2.reshape(e2.shape[0], h, -1, e2.shape[-1]).mean(2)  # the query heads of each KV head see its keys
    d2 = e2.shape[-1] // 2
    pair = ((e2[..., :d2] + e2[..., d2:]) / 2).sqrt().clamp_min(1e-6)
    return torch.cat([pair, pair], -1)


store.KVStore._allocate = _patched_allocate
store.KVStore._encode_tails = _patched_tails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tails", default="8/8,6/6,5/5,4/4,8/5,5/8")
    ap.add_argument("--key-bits", default="", help="also rebuild the keys at these effective bits (comma-separated)")
    args = ap.parse_args()
    books = Codebooks.load("out/default.safetensors")
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    dev = held_out_windows(tok, load_text("enwiki-excerpt", split="test"), 2048, 6, books.calibration).ids[4:6]
    n, g = dev.shape[1], books.k.group
    frac = sum((t - t // g * g) / t for t in range(1, n + 1)) / n  # mean share of the tail in what is held
    variants = {"": books} | {f"@{kb}": make_rows([f"lambda-lloyd@{kb}/4"], books, n, generation=True)[f"lambda-lloyd@{kb}/4"]
                              for kb in args.key_bits.split(",") if kb}

    rms = channel_rms(books)

    def factory(b, bits, normed):
        def new():
            cache = make_cache(model, b, tail="exact" if normed else "int8")  # normed: fake-quantized rows, held exact
            for i, layer in enumerate(cache.layers):
                if normed:
                    layer._tail_norm = (*bits, rms[i])
                else:
                    layer._tail_bits = bits
            return cache
        return new

    caches, saved, int8 = {"fp": lambda: DynamicCache(config=model.config)}, {}, {}
    for vname, b in variants.items():
        for spec in args.tails.split(","):
            ks, vs = spec.split("/")
            kb, vb, normed = int(ks.rstrip("n")), int(vs), ks.endswith("n")
            name = f"K{vname or ' 3.65'} tail {spec}"
            caches[name], saved[name] = factory(b, (kb, vb), normed), 0.5 * (16 - kb - vb) * frac
            if normed:  # held exact (a float container): count it as the INT8 cache of the same keys, less the cut
                if vname not in int8:
                    int8[vname] = held_bits(factory(b, (8, 8), False), model, n)
                saved[name] = (saved[name], int8[vname])
    t0 = time.time()
    rows = evaluate_generation(model, dev, caches)
    for name, cut in saved.items():  # the replay counts the int8 container: take off what b bits would not hold
        r = rows[name]
        if isinstance(cut, tuple):
            cut, int8 = cut
            r = replace(r, effective_bits=int8.mean, kv_bits_end=int8.end, kv_bits_max=int8.max)
        rows[name] = replace(r, effective_bits=r.effective_bits - cut, kv_bits_max=r.kv_bits_max - cut / frac)
    print(f"smollm2-135m · enwiki-excerpt · development windows 5–6 × {n} · float32 · generation mode · "
          f"out/default.safetensors · tail share {frac:.4f} · {time.time() - t0:.0f} s")
    print(format_table(rows))


if __name__ == "__main__":
    main()
