"""How the deployed cache holds the newest incomplete group, chosen on development windows by the
mean bits held and the quality at that mean (BENCHMARKS.md "The newest group: exact or INT8").

Keys are quantized per channel once their group of G tokens is complete, values with them; until
then both are the residual, held ``exact`` (the model's dtype: 16 bits in bf16) or ``int8`` (per
token and KV head, fp16 absmax scale: 8.25 bits at head_dim 64), the group quantized from those
INT8 entries when it completes (:data:`kvquant.cache.TAIL_FORMATS`).
fp and the codebook file's own row with each format run through the cache on the development
windows (the ``--dev`` windows after the first ``--windows``, which the main job reports on), in
the model's own dtype.

Usage:  python eval/tail_format.py [--codebooks out/default.safetensors] [--windows 4] [--dev 2]
Prints a markdown table and writes out/tail_format.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", default=str(ROOT / "out" / "default.safetensors"))
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows (first of the text; not used here)")
    ap.add_argument("--dev", type=int, default=2, help="development windows, after the evaluation windows")
    args = ap.parse_args()

    from kvquant.io.assets import load_model
    from kvquant.cache import TAIL_FORMATS
    from kvquant.codebooks import Codebooks
    from kvquant.io.data import held_out_windows, load_text
    from kvquant.io.fileio import write_text
    from kvquant.evaluation.generation import cache_factories, evaluate_generation
    from kvquant.evaluation.perplexity import format_table

    books = Codebooks.load(args.codebooks)
    model, tok = load_model("smollm2-135m")
    windows = held_out_windows(tok, load_text("enwiki-excerpt", split="test"), books.calibration["seqlen"],
                               args.windows + args.dev, books.calibration, source="enwiki-excerpt")
    dev = windows.ids[args.windows:]
    factories = cache_factories(model, {"fp": None})
    for tail in TAIL_FORMATS:
        factories[f"{tail} tail"] = cache_factories(model, {"kvquant": books}, tail=tail)["kvquant"]
    results = evaluate_generation(model, dev, factories)
    title = (f"smollm2-135m · enwiki-excerpt · development windows {args.windows + 1}–{args.windows + args.dev} × "
             f"{dev.shape[1]} tokens · {str(model.dtype).removeprefix('torch.')} · generation mode · "
             f"{Path(args.codebooks).name}, the newest incomplete group's keys and values exact or INT8")
    print(title)
    print(format_table(results))
    write_text(ROOT / "out" / "tail_format.json", json.dumps(
        {"title": title, "rows": {k: v.to_dict() for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
