"""Queries quantized causally beside the deployed KV cache: the rule chosen on development windows,
the rows reported on evaluation windows (BENCHMARKS.md "Queries quantized beside the cache").

A decoder quantizes each query from its own token (it has no later queries), so the query rules
here are static per-channel tables from the calibration (:meth:`kvquant.codebooks.Codebooks.causal_queries`):
``channel`` — (x − μ_c)/σ_c through the head's pair codebooks; ``channel-token`` — the same with one
fp16 scale per token and head that maps its largest entry onto the outermost center of the head's
2^B-level codebook (+16/D bits). Both with their levels allocated over channels (2 … 2^(B+2),
mean B: reverse water-filling of the calibration's query Fisher weights); ``klt`` — ``channel-token``
on the components of the Fisher-weighted queries' eigenbasis, levels allocated over components
(transform coding, :meth:`kvquant.codebooks.Codebooks.causal_queries`); ``channel-token uniform``
— every channel at 2^B levels, the rule before the allocation — is shown beside them.

(1) Selection on the development windows (the ``--dev`` windows after the first ``--windows``),
    simulated path (one forward per window; values exact; keys as the cache serves them:
    block-causal, the file's own), in the model's dtype: queries exact, through each causal rule at
    ``--select-bits``, and through the file's own group-normalised queries (look-ahead: their
    ranges span up to G − 1 later queries, which no decoder has: the reference a causal rule aims
    at). The rule, fixed before the run: the causal norm with the lower KL divergence from fp.
(2) The evaluation windows in generation mode (every token reads the cache, K and V quantized): fp,
    and for each cache row (the file's own, ``lambda-lloyd@2.65/3``, ``lambda-lloyd@1.65/2``) its
    queries exact, through ``channel-token`` (the rule chosen before ``klt`` existed) and through the
    chosen rule, at 4 / 3 / 2 bits.

Usage:  python eval/causal_queries.py --codebooks out/default.safetensors [--windows 4] [--dev 2]
Prints markdown, writes out/causal_queries.json and the ``causal-queries`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path

from kvquant import query_quantizer
from kvquant.codebooks.books import CAUSAL_QUERY_NORMS
from kvquant.io.data import held_out_windows
from kvquant.evaluation.diagnostics import KeysOnly, QueryKeyPair
from kvquant.io.fileio import replace_section, write_text
from kvquant.evaluation.generation import cache_factories, evaluate_generation
from kvquant.evaluation.perplexity import evaluate, format_table, make_rows

ROOT = Path(__file__).resolve().parents[1]
RULES = CAUSAL_QUERY_NORMS
EARLIER = "channel-token"  # the rule chosen before klt existed (2026-12-05): its rows stay beside the chosen one
UNIFORM = "channel-token uniform"


def uniform_levels(books, bits: int):
    """``channel-token`` queries with every channel at 2^bits levels (the rule before allocation)."""
    return books.rebuilt(norm="channel-token", bits_q=bits, bits_k=bits, budget=0.0, budget_sides="qk",
                         scale_bits=16, outliers=0.0)
#: cache rows and the bits of their queries
CACHES = {"lambda-lloyd": 4, "lambda-lloyd@2.65/3": 3, "lambda-lloyd@1.65/2": 2}


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--select-bits", type=int, default=4)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    books, model, tok, text = load(args, dtype=getattr(torch, args.dtype))
    seqlen = books.calibration["seqlen"]
    windows = held_out_windows(tok, text, seqlen, args.windows + args.dev, books.calibration)
    ev, dev = windows.ids[: args.windows], windows.ids[args.windows :]
    b = args.select_bits

    lookahead = books.rebuilt(bits_q=b, bits_k=b, budget=0.0, budget_sides="qk")  # its queries only are used
    sim = {"fp": None, "queries exact": KeysOnly(books),
           **{f"{rule}@{b}": QueryKeyPair(books.causal_queries(b, norm=rule), books) for rule in RULES},
           f"{UNIFORM}@{b}": QueryKeyPair(uniform_levels(books, b), books),
           f"look-ahead groups@{b} (not causal)": QueryKeyPair(lookahead, books)}
    caches = cache_factories(model, {"fp": None, **make_rows(list(CACHES), books, seqlen, generation=True)})
    queries = {(name, rule): query_quantizer(books.causal_queries(qbits, norm=rule), model)  # built before the
               for name, qbits in CACHES.items() for rule in RULES}                           # runs: errors first

    dev_res = evaluate(model, dev, sim)
    chosen = min(RULES, key=lambda rule: dev_res[f"{rule}@{b}"].kld)
    factories, row_queries = {"fp": caches["fp"]}, {}
    for name, qbits in CACHES.items():
        factories[name] = caches[name]
        for rule in dict.fromkeys((EARLIER, chosen)):  # the earlier rule beside the chosen one
            label = f"{name} +q{qbits} {rule}"
            factories[label], row_queries[label] = caches[name], queries[name, rule]
    ev_res = evaluate_generation(model, ev, factories, queries=row_queries)

    cmd = "python eval/causal_queries.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join([
        f"## Queries quantized beside the cache, causally ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `{cmd}` — {args.model}, {args.dataset}, {seqlen}-token windows, {args.dtype}; codebook file "
        f"`{Path(args.codebooks).name}`. Queries are quantized from their own token: `channel` static per-channel "
        "(μ, σ) and the head's pair codebooks; `channel-token` the same with an fp16 scale per token and head mapping "
        "its largest entry onto the outermost center of the head's 2^B-level codebook (+16/64 bits per query entry); "
        "both with levels allocated over channels (2 … 2^(B+2), mean B, by the calibration's query Fisher weights); "
        "`klt` `channel-token` on the components of the Fisher-weighted queries' eigenbasis (calibration tokens), "
        "levels allocated over components; "
        "`channel-token uniform` every channel at 2^B levels (the rule before the allocation); the first token exact. "
        "Query bits are not held (queries are not cached).", "",
        f"**Selection** (development windows {args.windows + 1}–{args.windows + args.dev}, simulated path: one forward "
        "per window, keys as the cache serves them, values exact; eff. bits: the mean of the query and key "
        f"sides). Rule fixed before the run: the causal norm with the lower KLD at {b} bits → **{chosen}**.", "",
        format_table(dev_res), "",
        f"**Evaluation** (windows 1–{args.windows}, generation mode: every token reads the cache, K and V quantized; "
        "eff. bits: K/V bits held, the mean over every position):", "",
        format_table(ev_res), "",
        f"_total {time.perf_counter() - t0:.0f} s_",
    ])
    print(md)
    write_text(ROOT / "out" / "causal_queries.json", json.dumps(
        {"command": cmd, "chosen": chosen, "dev": {k: r.to_dict() for k, r in dev_res.items()},
         "eval": {k: r.to_dict() for k, r in ev_res.items()}}, indent=1))
    replace_section(ROOT / "BENCHMARKS.md", "causal-queries", md)


if __name__ == "__main__":
    main()
