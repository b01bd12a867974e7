"""Exploratory: how much an int8 ``Q̂·K̂ᵀ`` could speed up prefill attention on this CPU: torch's int8 GEMM
(``torch._int_mm``, oneDNN: VNNI / AMX-INT8 where the CPU has them) against the bf16 GEMM of the
same scores, and both against the whole bf16 attention (``scaled_dot_product_attention``, causal),
at SmolLM2-135M's geometry (9 query heads, head_dim 64), one sequence.

The scores are one GEMM per head, (T × D)·(D × T) — int8 inputs, int32 out — against the bf16
GEMM of the same shape; ``share`` is the bf16 scores' time over SDPA's, which bounds what a faster
``Q·Kᵀ`` alone can buy (softmax and ``P·V`` stay). Causal masking is not exploited by the GEMMs
(SDPA's flash kernel skips the masked blocks), so the GEMM rows overstate what the scores cost.

Usage:  python eval/research/int8_scores.py [--lengths 2048,8192] [--threads 1,2]
Prints a markdown table (milliseconds, medians of --reps runs).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    h, d = args.heads, args.head_dim
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; {h} heads, "
          f"head_dim {d}\n")
    print("| tokens | threads | int8 scores ms | bf16 scores ms | int8 / bf16 | bf16 SDPA (causal) ms "
          "| bf16 scores / SDPA |")
    print("|---|---|---|---|---|---|---|")
    for t in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(0)
        q8 = torch.randint(-127, 128, (h, t, d), dtype=torch.int8, generator=g)
        k8 = torch.randint(-127, 128, (h, d, t), dtype=torch.int8, generator=g)
        qb, kb = q8.to(torch.bfloat16), k8.to(torch.bfloat16)
        q, k, v = (torch.randn(1, h, t, d, generator=g).to(torch.bfloat16) for _ in range(3))
        for threads in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(threads)
            i8 = median_ms(lambda: [torch._int_mm(q8[i], k8[i]) for i in range(h)], args.reps)
            bf = median_ms(lambda: torch.bmm(qb, kb), args.reps)
            sd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.reps)
            print(f"| {t} | {threads} | {i8:.1f} | {bf:.1f} | {i8 / bf:.2f} | {sd:.1f} | {bf / sd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
