"""How to normalise the cached values: chosen on development windows, reported on evaluation windows.

Generation mode (``kvquant/evaluation/generation.py``) through kvquant's KV cache with a codebook file's
keys (as deployed: pre-RoPE, 8-bit group scales, allocated channels) and the values at ``--bits``
bits under each normalisation of :data:`kvquant.cache.VALUE_NORMS` — ``rms`` (ρ = 0 codebook ×
fp16 RMS per token) and ``minmax`` (asymmetric INT per token, 8-bit mid/half) — both 16 bits of
scale per token and head, so equal bytes. Windows: the first ``--windows`` of the text are the
evaluation windows (as everywhere in BENCHMARKS.md), the ``--dev`` after them the development
windows; calibration (the codebook file) used the end of the text. The selection is made on the
development windows only.

Usage:  python eval/value_norm.py --codebooks out/default.safetensors [--windows 4] [--dev 2] [--bits 4,2]
Prints a markdown table and writes out/value_norm.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path
from transformers import DynamicCache

from kvquant.cache import VALUE_NORMS, make_cache
from kvquant.io.data import held_out_windows
from kvquant.io.fileio import write_text
from kvquant.evaluation.generation import evaluate_generation

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--bits", default="4,2")
    args = ap.parse_args(argv)
    books, model, tok, text = load(args)
    windows = held_out_windows(tok, text, args.seqlen, args.windows + args.dev, books.calibration)
    ids = windows.ids
    sets = {"dev": ids[args.windows :], "eval": ids[: args.windows]}
    rows = {"fp": lambda: DynamicCache(config=model.config)}
    for bits in (int(b) for b in args.bits.split(",")):
        for norm in VALUE_NORMS:
            rows[f"V{bits} {norm}"] = lambda b=bits, n=norm: make_cache(model, books, bits_v=b, values=n)
    results = {name: {k: r.to_dict() for k, r in evaluate_generation(model, w, rows).items()} for name, w in sets.items()}
    command = "python eval/value_norm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`{command}` — {args.model}, {args.dataset}, seqlen {args.seqlen}, evaluation = the first {args.windows} "
             f"windows, development = the next {args.dev}; keys from {args.codebooks}; queries exact; float32", "",
             "| row | K/V bits held | dev Δ vs fp | eval Δ vs fp | selected on dev |", "|---|---|---|---|---|"]
    for bits in (int(b) for b in args.bits.split(",")):
        names = [f"V{bits} {n}" for n in VALUE_NORMS]
        best = min(names, key=lambda n: results["dev"][n]["ppl"])
        for n in names:
            d, e = (results[s][n]["ppl"] / results[s]["fp"]["ppl"] - 1 for s in ("dev", "eval"))
            lines.append(f"| {n} | {results['eval'][n]['effective_bits']:.2f} | {d:+.2%} | {e:+.2%} | "
                         f"{'✔' if n == best else ''} |")
    print("\n".join(lines))
    write_text(ROOT / "out" / "value_norm.json", json.dumps({"command": command, "results": results}, indent=1))


if __name__ == "__main__":
    main()
