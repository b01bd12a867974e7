"""Exploratory: where a decoding step's time goes, kvquant's cache against transformers' DynamicCache.

Prefills (eval/bench_decode.py's ``prefill`` and ``greedy_step``) ``--context`` tokens of enwiki-excerpt (the start of the text, held out from the codebook
file's calibration) into each cache, times ``--steps`` greedy steps (median) on 1 thread, then
prints cProfile's functions by own time over the same steps for each cache — e.g. the C kernel
(``kvquant.kernels.cpu.decode_step``) against ``scaled_dot_product_attention`` plus
DynamicCache's ``torch.cat`` of every held token.

Usage:  python eval/research/step_profile.py --codebooks out/default.safetensors [--context 8192]
            [--dtype float32] [--steps 4]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: bench_decode's prefill and timed step
from bench_decode import greedy_step, prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", default="out/default.safetensors")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=12, help="functions listed per cache")
    args = ap.parse_args()

    from transformers import DynamicCache

    import kvquant
    from kvquant.io.assets import load_model
    from kvquant.io.data import load_text

    model, tok = load_model("smollm2-135m", dtype=getattr(torch, args.dtype))
    books = kvquant.Codebooks.load(args.codebooks)
    ids = tok(load_text("enwiki-excerpt", split="test"), return_tensors="pt").input_ids[:, : args.context]

    def first_token(cache) -> torch.Tensor:
        torch.set_num_threads(2)
        with torch.no_grad():
            nxt = prefill(model, ids, cache)
        torch.set_num_threads(1)
        return nxt

    def steps(cache, nxt: torch.Tensor) -> float:
        times = []
        for _ in range(args.steps):
            nxt, seconds, _ = greedy_step(model, cache, nxt)
            times.append(seconds)
        return statistics.median(times)

    caches = {"DynamicCache": DynamicCache(config=model.config), "kvquant": kvquant.make_cache(model, books)}
    first = {name: first_token(cache) for name, cache in caches.items()}
    print(f"smollm2-135m · {args.dtype} · {args.context} tokens held · batch 1 · 1 thread · "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for name, cache in caches.items():
        print(f"{name}: {steps(cache, first[name]) * 1e3:.1f} ms per step (median of {args.steps})")
    for name, cache in caches.items():
        prof = cProfile.Profile()
        prof.enable()
        steps(cache, first[name])
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"\n== {name}: {args.steps} steps, functions by own time\n{out.getvalue()}")


if __name__ == "__main__":
    main()
