"""Exploratory: how far generation-mode perplexity as measured (chunks, `kvquant eval-ppl --mode generation`)
is from what decoding runs (one token per step; through kvquant's cache every step reads the codes).

The chunks are cut where the cache changes how it returns tokens already seen
(:func:`kvquant.evaluation.generation.chunk_starts`), so both feed each query the same keys and values — up
to float rounding (a prefill SDPA over a chunk, a decoding step's kernel), which a quantizer in a
later layer can turn into a different code for a key near a boundary. This script measures that
gap on held-out windows.

Usage:  python eval/research/token_by_token.py --codebooks out/default.safetensors [--rows lambda-lloyd,...]
                                               [--windows 1] [--seqlen 2048] [--threads 2]
Prints a markdown table (docs/results.md shows one run).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/, for its shared heldout.py
from heldout import codebook_parser, load  # noqa: E402

from kvquant.hf.compat import cache_kwargs
from kvquant.io.data import held_out_windows
from kvquant.evaluation.generation import cache_factories, generation_nll
from kvquant.evaluation.perplexity import make_rows


@torch.no_grad()
def stepwise_nll(model, ids: torch.Tensor, new_cache) -> float:
    """Summed next-token NLL of each row of ``ids`` decoded one token per step through a fresh cache."""
    total = 0.0
    for row in ids:
        cache = new_cache()
        for t in range(row.numel() - 1):
            logits = model(row[None, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1]
            total += float(F.cross_entropy(logits[None].float(), row[t + 1 : t + 2]))
    return total


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--rows", default="lambda-lloyd,lambda-lloyd@1.65/2,kivi@2/2")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    books, model, tok, text = load(args)
    ids = held_out_windows(tok, text, args.seqlen, args.windows, books.calibration).ids
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    factories = cache_factories(model, make_rows(names, books, seqlen=args.seqlen, generation=True))
    print(f"`python eval/research/token_by_token.py {' '.join(argv if argv is not None else sys.argv[1:])}` — {args.model}, "
          f"the first {args.windows} held-out window(s) of {args.seqlen} tokens, float32\n")
    print("| row | ppl, chunks (as measured) | ppl, token by token | gap | steps read the codes |")
    print("|---|---|---|---|---|")
    for name in names:
        t0 = time.perf_counter()
        total, count, cache = generation_nll(model, ids, factories[name], progress=False)
        stepwise = stepwise_nll(model, ids, factories[name])
        reads = bool(getattr(cache, "reads_codes", lambda: False)())
        a, b = math.exp(total / count), math.exp(stepwise / count)
        print(f"| {name} | {a:.4f} | {b:.4f} | {b / a - 1:+.3%} | {'yes' if reads else 'no'} |  <!-- {time.perf_counter() - t0:.0f} s -->",
              flush=True)


if __name__ == "__main__":
    main()
