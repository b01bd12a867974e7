"""Exploratory: one layer's decoding-step attention alone — kvquant's C kernel reading the codes
(:func:`kvquant.kernels.dispatch.attend`) against what a float32 DynamicCache layer does per step
(``torch.cat`` of the new token onto every held key and value, then SDPA) — and the whole per-layer
cache work of a step (storing the new token, attending; each side's crop of it back untimed) —
on SmolLM2-135M's
geometry (3 KV heads, 9 query heads, head_dim 64) with the default codebook file's layer-0 tables.
Keys and values are random normal (timing only; their content changes no branch of the kernel).
Where the native kernel is the AVX-512 build, the same step on the AVX2 build (8-float vectors) is
timed beside it, interleaved, in the same process.

Usage:  python eval/research/attend_bench.py --codebooks out/default.safetensors [--contexts 2048,8192]
            [--threads 1] [--repeats 50] [--dtype float32] [--values hadamard|minmax|rms]
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
    ap.add_argument("--values", default=None, choices=("hadamard", "minmax", "rms"),
                    help="the cache's value normalisation (default: make_cache's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype: queries, exact tokens, outputs and the DynamicCache side")
    args = ap.parse_args()

    import kvquant
    from kvquant.cache import make_cache
    from kvquant.io.assets import load_model
    from kvquant.kernels import cpu as cpu_kernels
    from kvquant.kernels.dispatch import attend
    from transformers.cache_utils import DynamicLayer

    native = cpu_kernels._library()
    narrow = None
    if cpu_kernels.lanes() == 16:  # the AVX-512 build: also time the AVX2 one
        features = cpu_kernels.cpu_features()
        cpu_kernels.cpu_features = lambda: features - {"avx512f"}
        cpu_kernels._library.cache_clear()
        narrow = cpu_kernels._library()
        cpu_kernels.cpu_features = lambda: features

    def on(lib):
        cpu_kernels._library = lambda: lib

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    model, _ = load_model("smollm2-135m", dtype=dt)
    books = kvquant.Codebooks.load(args.codebooks)
    cfg = model.config
    h, hq, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    print(f"threads {args.threads}; ms per layer step (median of {args.repeats})")
    print(f"context | C kernel (attend) | cat + SDPA ({args.dtype}) | ratio | store + attend | "
          "DynamicLayer update + SDPA | ratio" + (" | C kernel, AVX2 build | AVX2 / AVX-512" if narrow else ""))
    for n in map(int, args.contexts.split(",")):
        cache = make_cache(model, books, values=args.values)
        layer = cache.layers[0]
        k, v = torch.randn(1, h, n, d, dtype=dt), torch.randn(1, h, n, d, dtype=dt)
        layer.store(k, v, torch.arange(n, dtype=torch.int32).expand(1, 1, n))
        q = torch.randn(1, hq, 1, d, dtype=dt)
        kn, vn = torch.randn(1, h, 1, d, dtype=dt), torch.randn(1, h, 1, d, dtype=dt)

        def dense():
            kk, vv = torch.cat([k, kn], -2), torch.cat([v, vn], -2)
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        on(native)
        kernel, sdpa = median_ms([lambda: attend(layer, q, None, None, 0), dense], args.repeats)
        extra = ""
        if narrow:
            wide, slim = median_ms([lambda: (on(native), attend(layer, q, None, None, 0)),
                                    lambda: (on(narrow), attend(layer, q, None, None, 0))], args.repeats)
            on(native)
            extra = f" | {slim:.2f} | {slim / wide:.2f}x"
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
              f"{dense_both / both:.2f}x{extra}")


if __name__ == "__main__":
    main()
