"""Exploratory: one layer's decoding-step attention alone — kvquant's C kernel reading the codes
(:func:`kvquant.kernels.dispatch.attend`) against what a float32 DynamicCache layer does per step
(``torch.cat`` of the new token onto every held key and value, then SDPA) — and the whole per-layer
cache work of a step (storing the new token, attending; each side's crop of it back untimed) —
on SmolLM2-135M's
geometry (3 KV heads, 9 query heads, head_dim 64) with the default codebook file's layer-0 tables.
Keys and values are random normal (timing only; their content changes no branch of the kernel).

Usage:  python eval/research/attend_bench.py --codebooks out/default.safetensors [--contexts 2048,8192]
            [--threads 1] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fns, repeats: int, after=None) -> list[float]:
    """Median milliseconds of each of ``fns``, called in turn ``repeats`` times (interleaved, so a
    noisy neighbour slows both alike); ``after[i]``, untimed, follows each call of ``fns[i]``."""
    after = after or [lambda: None] * len(fns)
    times = [[] for _ in fns]
    for fn, undo in zip(fns, after):
        fn()
        undo()
    for _ in range(repeats):
        for fn, undo, ts in zip(fns, after, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
            undo()
    return [1e3 * statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", default="out/default.safetensors")
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    import kvquant
    from kvquant.cache import make_cache
    from kvquant.io.assets import load_model
    from kvquant.kernels.dispatch import attend
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m", dtype=torch.float32)
    books = kvquant.Codebooks.load(args.codebooks)
    cfg = model.config
    h, hq, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    print(f"threads {args.threads}; ms per layer step (median of {args.repeats})")
    print("context | C kernel (attend) | cat + SDPA (float32) | ratio | store + attend | "
          "DynamicLayer update + SDPA | ratio")
    for n in map(int, args.contexts.split(",")):
        cache = make_cache(model, books)
        layer = cache.layers[0]
        k, v = torch.randn(1, h, n, d), torch.randn(1, h, n, d)
        layer.store(k, v, torch.arange(n, dtype=torch.int32).expand(1, 1, n))
        q = torch.randn(1, hq, 1, d)
        kn, vn = torch.randn(1, h, 1, d), torch.randn(1, h, 1, d)

        def dense():
            kk, vv = torch.cat([k, kn], -2), torch.cat([v, vn], -2)
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        kernel, sdpa = median_ms([lambda: attend(layer, q, None, None, 0), dense], args.repeats)
        # the whole per-layer cache work of a step: store the new token, then attend (taken back after)
        dyn = DynamicLayer()
        dyn.update(k.clone(), v.clone())
        pos = torch.full((1, 1, 1), n, dtype=torch.int32)

        def kv_step():
            layer.store(kn, vn, pos)
            attend(layer, q, None, None, 0)

        def dyn_step():
            kk, vv = dyn.update(kn, vn)
            F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        both, dense_both = median_ms([kv_step, dyn_step], args.repeats, [lambda: layer.crop(-1), lambda: dyn.crop(-1)])
        print(f"{n} | {kernel:.2f} | {sdpa:.2f} | {sdpa / kernel:.2f}x | {both:.2f} | {dense_both:.2f} | "
              f"{dense_both / both:.2f}x")


if __name__ == "__main__":
    main()
