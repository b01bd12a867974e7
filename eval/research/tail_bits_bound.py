"""Exploratory: the mean K/V bits a group cache holds over a window's positions, on paper, for
newest-group (tail) formats that do not exist yet — how low the tail must go for a mean of 4.0.

After t tokens a cache with key groups of G holds C = ⌊t/G⌋·G tokens as codes and t − C in the tail;
the first ``sink`` tokens also keep an exact 16-bit copy. Per K/V entry, averaging keys and values:

    bits(t) = ½ [ (C·(k + 2·s/G) + (t − C)·tail_k + sink·16) / t + (C·(v + 16/D) + (t − C)·tail_v + sink·16) / t ]

with k the keys' packed code bits, s the bits of each stored (mid, half), v the values' code bits
(their 8-bit mid/half per token and head: 16/D). The mean over t = 1 … T is what
``kvquant.evaluation.generation.held_bits`` measures on a real cache (the shape-only replay); the
first row here (INT8 tail: 8 + 16/D bits) reproduces the main job's measured mean within a few
hundredths (BENCHMARKS "The main job": 4.38 mean, 3.97 at the end).

Usage:  python eval/research/tail_bits_bound.py [--seqlen 2048] [--group 64] [--key-bits 3.40]
"""

from __future__ import annotations

import argparse


def mean_bits(T: int, G: int, k: float, v: float, tail_k: float, tail_v: float, s: int, D: int, sink: int) -> tuple[float, float]:
    """(mean over t = 1 … T, value at T) of the K/V bits held per entry (formula above)."""
    total, last = 0.0, 0.0
    for t in range(1, T + 1):
        c, e = t // G * G, min(sink, t) * 16
        keys = (c * (k + 2 * s / G) + (t - c) * tail_k + e) / t
        values = (c * (v + 16 / D) + (t - c) * tail_v + e) / t
        last = (keys + values) / 2
        total += last
    return total / T, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--key-bits", type=float, default=3.40, help="packed key code bits (the default file: 3.39)")
    ap.add_argument("--value-bits", type=float, default=4.0)
    ap.add_argument("--scale-bits", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--sink", type=int, default=1)
    args = ap.parse_args()
    int8 = 8 + 16 / args.head_dim
    code_k, code_v = args.key_bits + 2 * args.scale_bits / args.group, args.value_bits + 16 / args.head_dim
    tails = [("INT8 keys and values (the default)", int8, int8), ("5-bit keys, INT8 values", 5 + 16 / args.head_dim, int8),
             ("keys at their code bits, INT8 values", code_k, int8), ("INT8 keys, values at their code bits", int8, code_v),
             ("keys and values at their code bits", code_k, code_v)]
    print(f"seqlen {args.seqlen}, group {args.group}, keys {args.key_bits} code bits + {args.scale_bits}-bit scales, "
          f"values {args.value_bits} bits + 16/{args.head_dim}, sink {args.sink}")
    print("| newest incomplete group held as | mean bits over positions | bits at the end |")
    print("|---|---|---|")
    for name, tk, tv in tails:
        mean, end = mean_bits(args.seqlen, args.group, args.key_bits, args.value_bits, tk, tv, args.scale_bits,
                              args.head_dim, args.sink)
        print(f"| {name} | {mean:.3f} | {end:.3f} |")


if __name__ == "__main__":
    main()
