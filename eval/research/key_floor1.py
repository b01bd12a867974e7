"""Exploratory: key channels allowed to drop their codes (1 level, 0 bits: the key read as its
group's mid), as the causal queries' ``klt`` rule drops its weakest components
(BENCHMARKS "Causal queries with levels allocated over channels", run 9).

The deployed keys give each (layer, KV head, channel) 2 … 2^cap levels, water-filled over the key
channels by ½ F_c ε(n) (:func:`kvquant.codebooks.allocation.allocate_levels`). Here 1 level is an
option too: ε(1) = Σ f x̃² / Σ f on the head's calibration histogram (x̃ = (k − mid)/half), so a
channel whose Fisher weight is small gives its code bits to the others; its (mid, half) are
stored as before (the effective bits are unchanged at the same code budget). Simulated only: a
dropped channel is held as a 2-level table whose centers are both 0 (k̂ = mid), its bits counted
as 0 in the printed mean.

Rows (development windows 5–6, simulated path, one forward per window, keys only — queries and
values exact —, block-causal as the cache reads them; ``out/default.safetensors``): for each key
target K, ``lambda-lloyd@K`` (the deployed allocation) and ``floor1@K``.

Usage:  python eval/research/key_floor1.py [K,...] [float32|bfloat16]   (default 2.65,3.65 float32)
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from functools import cache

import torch

from kvquant.codebooks import Codebooks
from kvquant.codebooks.allocation import allocate_levels, channel_tables
from kvquant.core import pair_codebooks as pcb
from kvquant.core.packing import level_bits
from kvquant.evaluation.diagnostics import KeysOnly
from kvquant.evaluation.perplexity import evaluate, format_table
from kvquant.io.assets import load_model
from kvquant.io.data import held_out_windows, load_text

targets = [float(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "2.65,3.65").split(",")]
dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32
torch.set_num_threads(2)
books = Codebooks.load("out/default.safetensors")
hist = books.hist
nodes = hist.nodes.numpy()
count, weight = hist.count_k.numpy(), hist.weight_k.numpy()


def floor1(deployed: Codebooks) -> Codebooks:
    """``deployed``'s keys re-allocated at the same code budget with a 1-level option."""
    cfg = deployed.config

    @cache
    def book(side: str, layer: int, h: int, n: int):
        return pcb.histogram_codebook(cfg.method, n, nodes, count[layer, h], weight[layer, h])

    levels = torch.from_numpy(allocate_levels(book, {"k": hist.fisher_k.numpy()}, {"k": hist.channel_fisher_k.numpy()},
                                              {"k": cfg.bits_k}, cfg.budget, nodes, min_levels=1)["k"])
    mean = sum(level_bits(int(n)) for n in levels.flatten()) / levels.numel()
    print(f"floor1@{cfg.budget:.3f} code bits: mean {mean:.3f}, {int((levels == 1).sum())} of {levels.numel()} key "
          f"channels dropped (deployed: mean {deployed.k.mean_bits:.3f})", flush=True)
    top, centers, bounds = channel_tables(lambda layer, h, n: book("k", layer, h, n), levels.clamp(min=2))
    centers[levels == 1] = 0.0  # k̂ = mid + half · 0
    return replace(deployed, k=replace(deployed.k, bits=top, centers=centers, boundaries=bounds,
                                       channel_levels=levels.clamp(min=2).to(torch.int16)))


model, tok = load_model("smollm2-135m", dtype=dtype)
text = load_text("enwiki-excerpt", split="test")
dev = held_out_windows(tok, text, 2048, 6, books.calibration).ids[4:6]
rows = {"fp": None}
for k in targets:
    deployed = books.at_effective_bits(k, 2048, budget_sides="k")
    rows[f"lambda-lloyd@{k:g} keys"] = KeysOnly(deployed)
    rows[f"floor1@{k:g} keys"] = KeysOnly(floor1(deployed))
t0 = time.time()
res = evaluate(model, dev, rows)
print(f"development windows 5-6, simulated, keys only (queries and values exact), block-causal; {dtype}")
print(format_table(res))
print("seconds", round(time.time() - t0))
