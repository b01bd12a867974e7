"""Greedy decoding through kvquant's KV cache with a codebook file, against transformers' DynamicCache.

After a ``--prompt``-token prompt (the start of the corpus, disjoint from the file's calibration
windows), ``--new`` tokens are generated greedily by every row in one process: ``--rows`` are
generation-mode rows as ``kvquant eval-ppl --mode generation`` takes them (``fp`` =
DynamicCache, the file's own method, ``METHOD@K/V``, ``kivi@B/V``, ``quanto@B``; values as the
row says, else the file's ``bits_v``). Per row: decode tokens/s (the new tokens over the time
after the prompt's prefill), the KV bytes per token held at the end, and agreement with the fp
continuation — the tokens equal to fp's before the first difference, and equal at the same
position overall.

Usage:  python eval/deployed_decode.py --codebooks out/default.safetensors [--model smollm2-135m]
                                       [--prompt 2048] [--new 32] [--rows fp,lambda-lloyd,...] [--threads 1]
Prints a markdown table and writes out/deployed_decode.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path

from kvquant.hf.compat import cache_kwargs
from kvquant.io.data import held_out_windows
from kvquant.io.fileio import write_text
from kvquant.evaluation.generation import cache_factories, kv_bits
from kvquant.evaluation.perplexity import make_rows

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new: int, cache) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``prompt`` (1, P) by ``new`` tokens and the decode tokens/s."""
    logits = model(prompt, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    out, t0 = [], time.perf_counter()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
        logits = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return torch.cat(out, dim=1)[0], new / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rows", default="fp,lambda-lloyd", help="comma-separated generation-mode rows, fp first")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    books, model, tok, text = load(args)
    prompt = held_out_windows(tok, text, args.prompt, 1, books.calibration).ids[:1]
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if names[:1] != ["fp"]:
        raise ValueError("--rows must start with fp (the continuation the others are compared with)")
    rows = cache_factories(model, make_rows(names, books, args.prompt, generation=True))
    results, ref = {}, None
    for name, new_cache in rows.items():
        cache = new_cache()
        tokens, speed = decode(model, prompt, args.new, cache)
        ref = tokens if ref is None else ref
        same = (tokens == ref).tolist()
        bits, per_token = kv_bits(cache)
        results[name] = {"tokens_per_s": speed, "kv_bits": bits, "kv_bytes_per_token": per_token,
                         "prefix_agreement": same.index(False) if False in same else len(same),
                         "agreement": sum(same), "text": tok.decode(tokens)}
    command = "python eval/deployed_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`{command}` — {args.model}, prompt = the first {args.prompt} tokens of {args.dataset}, "
             f"{args.new} greedy tokens, float32, {args.threads} thread(s), codebooks {args.codebooks}", "",
             "| row | decode tokens/s | × fp | K/V bits held | bytes/token | equal to fp before the first difference | equal overall |",
             "|---|---|---|---|---|---|---|"]
    fp_speed = next(iter(results.values()))["tokens_per_s"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / fp_speed:.2f} | {r['kv_bits']:.2f} | "
                     f"{r['kv_bytes_per_token']:.0f} | {r['prefix_agreement']}/{args.new} | {r['agreement']}/{args.new} |")
    print("\n".join(lines))
    write_text(ROOT / "out" / "deployed_decode.json", json.dumps({"command": command, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
