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
``library``   the library's ``klt`` since that screen: up to 2^(B+3) levels, the largest |y| onto
              max(the 2^B book's outermost center, E[max of D |N(0, 1)|]).

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
from kvquant.codebooks.allocation import expected_max_abs_gaussian
from kvquant.codebooks.books import allocated_levels, book_edges
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


emax = expected_max_abs_gaussian(D)  # 2.596 at D = 64; the first screen sampled it: 2.60
book_edge = book_edges(method, rho, bits)
made = {
    "library": lambda: base,
    "klt": lambda: variant(bits + 2, bits, True, book_edge),
    "cap+1": lambda: variant(bits + 3, bits, True, book_edge),
    "static": lambda: variant(bits + 2, bits + 16 / D, False),
    "emax": lambda: variant(bits + 2, bits, True, emax),
    "emax+cap+1": lambda: variant(bits + 3, bits, True, emax),
}
rows = {"fp": None, f"{cache_row} keys, queries exact": KeysOnly(keys),
        **{f"{v}@{bits}": QueryKeyPair(made[v](), keys) for v in variants}}
t0 = time.time()
res = evaluate(model, dev, rows)
print(f"development windows 5-6, simulated; keys of {cache_row}; queries at {bits} code bits (+16/{D} for a token "
      f"scale; static: {bits} + 16/{D}); emax = {emax:.2f}")
print(format_table(res))
print("seconds", round(time.time() - t0))
