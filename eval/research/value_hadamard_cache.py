"""Exploratory: values rotated by a Hadamard matrix before their per-token INT codes, through the
real KV cache (``make_cache(..., values="hadamard")``) against the default ``minmax`` values, at
the K/V splits ``eval/deployed.py`` fits to 4 and 3 bits held on average, on the development
windows (5–6) in generation mode. (``eval/research/value_rotation.py``: the value quantizer alone.)

Both rows dequantize for the window's multi-token steps as every generation-mode row does (the
values rotated back before SDPA), so they differ only in the values' codes.

Usage:  python eval/research/value_hadamard_cache.py [--codebooks out/default.safetensors]
            [--rows lambda-lloyd@3.65/4,...] [--dtype auto]
"""

from __future__ import annotations

import argparse

from kvquant.codebooks import Codebooks
from kvquant.evaluation.generation import cache_factories, evaluate_generation
from kvquant.evaluation.perplexity import format_table, make_rows
from kvquant.io.assets import load_model
from kvquant.io.data import held_out_windows, load_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", default="out/default.safetensors")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="lambda-lloyd@3.65/4,lambda-lloyd@2.75/4,lambda-lloyd@3.8/3,"
                                      "lambda-lloyd@1.65/3,lambda-lloyd@2.6/2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows before the development ones")
    ap.add_argument("--dev", type=int, default=2)
    args = ap.parse_args()
    books = Codebooks.load(args.codebooks)
    model, tok = load_model(args.model, dtype=args.dtype)
    wins = held_out_windows(tok, load_text("enwiki-excerpt", split="test"), 2048, args.windows + args.dev,
                            books.calibration)
    dev = wins.ids[args.windows:]
    names = args.rows.split(",")
    rows = make_rows(["fp", *names], books, 2048, generation=True)
    by_norm = {v: cache_factories(model, rows, values=v) for v in ("minmax", "hadamard")}
    caches = {"fp": by_norm["minmax"]["fp"]}
    caches.update({f"{name} {v}": by_norm[v][name] for name in names for v in by_norm})
    res = evaluate_generation(model, dev, caches)
    print(f"{args.model}, {model.dtype}, development windows {args.windows + 1}–{args.windows + args.dev} × 2048, "
          "generation mode, queries exact")
    print(format_table(res))


if __name__ == "__main__":
    main()
