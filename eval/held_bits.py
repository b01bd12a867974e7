"""K/V bits held at every length: the table "Bits held by length" of BENCHMARKS.md.

What a cache holds depends only on how many tokens it holds, so each row's cache is replayed shape
only (:func:`kvquant.evaluation.generation.held_bits_curve`: one synthetic token at a time, storage only,
every byte counted) up to ``--max-len`` tokens, in the model's own dtype. The table gives the
bits per K/V entry after ``L`` tokens for lengths around group boundaries, and the mean over
every position up to 2048 and up to ``--max-len``.

Usage:  python eval/held_bits.py [--codebooks out/default.safetensors] [--rows default,kivi@4/4,quanto@4]
        [--max-len 8192]
Prints a markdown table and writes out/held_bits.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (256, 300, 512, 1000, 1100, 1536, 1600, 1700, 2000, 2048, 2100, 4000, 4096, 8000, 8192)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", default=str(ROOT / "out" / "default.safetensors"))
    ap.add_argument("--rows", default="default,kivi@4/4,kivi@2/2,quanto@4",
                    help="'default' is the codebook file's own row; others as eval-ppl --baselines in generation mode")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-len", type=int, default=8192)
    args = ap.parse_args()

    from kvquant.io.assets import load_model
    from kvquant.codebooks import Codebooks
    from kvquant.io.fileio import write_text
    from kvquant.evaluation.generation import cache_factories, held_bits_curve
    from kvquant.evaluation.perplexity import make_rows

    model, _ = load_model(args.model)
    books = Codebooks.load(args.codebooks)
    names = [r for r in args.rows.split(",") if r]
    rows = {n: (books if n == "default" else make_rows([n], books, books.calibration["seqlen"], generation=True)[n])
            for n in names}
    factories = cache_factories(model, rows)
    lengths = [n for n in LENGTHS if n <= args.max_len]
    curves = {name: held_bits_curve(new, model, args.max_len) for name, new in factories.items()}
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"{args.model} · {dtype} · K/V bits per entry held after L tokens (every byte counted) · "
          f"{Path(args.codebooks).name}")
    print("| row | " + " | ".join(str(n) for n in lengths) + f" | mean ≤2048 | mean ≤{args.max_len} |")
    print("|---|" + "---|" * (len(lengths) + 2))
    out = {}
    for name, c in curves.items():
        at = {n: c[n - 1] for n in lengths}
        m2048, mall = sum(c[:2048]) / min(2048, len(c)), sum(c) / len(c)
        print(f"| {name} | " + " | ".join(f"{at[n]:.2f}" for n in lengths) + f" | {m2048:.2f} | {mall:.2f} |")
        out[name] = {"at": at, "mean_2048": m2048, "mean_all": mall}
    write_text(ROOT / "out" / "held_bits.json", json.dumps(
        {"model": args.model, "dtype": dtype, "codebooks": args.codebooks, "max_len": args.max_len, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
