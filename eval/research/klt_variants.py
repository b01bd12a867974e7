"""Exploratory: variants of the library's ``klt`` causal queries (:meth:`kvquant.codebooks.Codebooks.causal_queries`)
at a given width, screened on the development windows (held-out windows 5–6), simulated path
(keys as a cache serves them: the cache row given, block-causal; values exact), by KL divergence.

Variants (the basis, its deviations and the per-channel normalisation are the library's; only the
levels and the token scale change). Names as in the logs of the first screen (2026-12-07,
logs/klt_variants_{2,3,4,2b}.log), when the library's ``klt`` was the first of them:
``klt``/``B+2 book`` levels 2 … 2^(B+2) water-filled over the components by their variances λ,
              mean B; one fp16 scale per token and head mapping the largest |y| onto the outermost
              center of the head's 2^B-level codebook (+16/D bits).
``cap+1``     the same with up to 2^(B+3) levels per component.
``static``    no per-token scale (the components are whitened: unit variance), the 16/D bits it
              took go to the levels instead (mean code bits B + 16/D: equal total bits).
``emax``      the token scale maps the largest |y| onto E[max of D |N(0, 1)|] (≈ 2.60 at D = 64): a
              scaled token is about unit Gaussian, as the component books assume.
``emax+cap+1`` both.
``library`` at that date (now ``previous``): up to 2^(B+3) levels, the largest |y| onto
              max(the 2^B book's outermost center, E[max of D |N(0, 1)|]).
``floor1``    ``previous`` with 1 level (0 bits: the component is its calibration mean) among the
              options of the water-filling, so components of tiny λ give their bits to others; the
              token scale still maps the largest |y| of all D components onto max(edge, E[max of D]).
``previous``  the library's ``klt`` between the two screens.
``library``   since the second screen (2026-12-07, logs/klt_variants_{2,3,4}_floor1.log): ``floor1``
              with the token's largest |y| taken over its coded components (n of them) onto
              max(edge, E[max of n |N(0, 1)|]).

Usage:  python eval/research/klt_variants.py BITS CACHE_ROW [VARIANTS] [float32|bfloat16]
        (e.g. ``2 lambda-lloyd@1.65/2``; ``4 lambda-lloyd klt,emax`` for the file's own keys;
        VARIANTS default: klt,cap+1,static,emax)
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch

from kvquant.codebooks import Codebooks
from kvquant.codebooks.allocation import (
    allocate_static_levels,
    cached_level_book,
    channel_tables,
    expected_max_abs_gaussian,
    rounded_stat,
)
from kvquant.codebooks.books import allocated_levels, book_edges
from kvquant.core.packing import level_bits
from kvquant.evaluation.diagnostics import KeysOnly, QueryKeyPair
from kvquant.evaluation.perplexity import evaluate, format_table, make_rows
from kvquant.io.assets import load_model
from kvquant.io.data import held_out_windows, load_text

bits, cache_row = int(sys.argv[1]), sys.argv[2]
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["klt", "cap+1", "static", "emax"]
dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
torch.set_num_threads(2)
books = Codebooks.load("out/default.safetensors")
model, tok = load_model("smollm2-135m", dtype=dtype)
text = load_text("enwiki-excerpt", split="test")
dev = held_out_windows(tok, text, 2048, 6, books.calibration).ids[4:6]
keys = make_rows([cache_row], books, 2048, generation=True)[cache_row]

base = books.causal_queries(bits, norm="klt")
method, rho = books.config.method, books.stats.channel_moments().rho.mean(-1)
lam = base.q.basis_sd.double() ** 2
D = lam.shape[-1]


def variant(cap: int, budget: float, token: bool, top: float | torch.Tensor | None = None) -> Codebooks:
    token_range = None
    if token:
        token_range = torch.full_like(base.q.token_range, top) if isinstance(top, float) else top
    q = allocated_levels(base.q, method, rho, lam, budget, cap, token_range)
    print(f"{budget:.2f} budget, cap {cap}: mean code bits {q.mean_bits:.3f}", flush=True)
    return replace(base, q=q)


def floor1() -> Codebooks:
    """``previous`` with a 1-level option (0 bits, ε = 1: the component set to its mean), the
    token's range over all D components (the levels as the library allocates them)."""
    levels = torch.from_numpy(allocate_static_levels(method, rho, lam.numpy(), bits + 3, float(bits), min_levels=1))
    print(f"floor1: mean code bits {sum(level_bits(int(n)) for n in levels.flatten()) / levels.numel():.3f}, "
          f"{int((levels == 1).sum())} of {levels.numel()} components at 1 level", flush=True)
    top, centers, bounds = channel_tables(
        lambda layer, h, n: cached_level_book(method, n, rounded_stat(rho[layer, h])), levels.clamp(min=2))
    centers[levels == 1] = 0.0  # one level: every code decodes to the component's mean
    q = replace(base.q, bits=top, centers=centers, boundaries=bounds, channel_levels=levels.clamp(min=2).to(torch.int16),
                token_range=torch.maximum(book_edge, torch.tensor(emax)).to(base.q.token_range.dtype))
    return replace(base, q=q)


emax = expected_max_abs_gaussian(D)  # 2.596 at D = 64; the first screen sampled it: 2.60
book_edge = book_edges(method, rho, bits)
made = {
    "library": lambda: base,
    "klt": lambda: variant(bits + 2, bits, True, book_edge),
    "cap+1": lambda: variant(bits + 3, bits, True, book_edge),
    "static": lambda: variant(bits + 2, bits + 16 / D, False),
    "emax": lambda: variant(bits + 2, bits, True, emax),
    "emax+cap+1": lambda: variant(bits + 3, bits, True, emax),
    "floor1": floor1,
    "previous": lambda: variant(bits + 3, bits, True, torch.maximum(book_edge, torch.tensor(emax))),
}
rows = {"fp": None, f"{cache_row} keys, queries exact": KeysOnly(keys),
        **{f"{v}@{bits}": QueryKeyPair(made[v](), keys) for v in variants}}
t0 = time.time()
res = evaluate(model, dev, rows)
print(f"development windows 5-6, simulated; keys of {cache_row}; queries at {bits} code bits (+16/{D} for a token "
      f"scale; static: {bits} + 16/{D}); emax = {emax:.2f}")
print(format_table(res))
print("seconds", round(time.time() - t0))
