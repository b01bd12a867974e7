"""Exploratory: how fast this CPU multiplies in float32, bfloat16 and float16 — why ``dtype="auto"``
loads in float32 where the half types have no hardware support (kvquant.io.dtypes).

Times one matmul of SmolLM2-135M's MLP shape (tokens × 576 @ 576 × 1536) and one forward of a
SmolLM2-shaped model with random weights (30 layers, 2048 tokens) in each dtype, all in one run,
median of ``--repeats``, on ``--threads`` threads. Prints a markdown table with the CPU and the
ratio to float32.

Usage:  python eval/research/cpu_dtypes.py [--tokens 2048] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30, help="layers of the SmolLM2-shaped model (its own: 30)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from kvquant.io.dtypes import native_dtype

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(args.tokens, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        mm = _median_seconds(lambda: a @ b, args.repeats)
        model = LlamaForCausalLM(config).to(dtype).eval()
        with torch.no_grad():
            fwd = _median_seconds(lambda: model(ids), args.repeats)
        rows.append((str(dtype).removeprefix("torch."), native_dtype(dtype), mm, fwd))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.tokens} tokens, median of {args.repeats}")
    print("| dtype | native (kvquant.io.dtypes) | matmul ms | × float32 | forward s | × float32 |")
    print("|---|---|---|---|---|---|")
    for name, native, mm, fwd in rows:
        print(f"| {name} | {native} | {mm * 1e3:.1f} | {mm / rows[0][2]:.1f} | {fwd:.2f} | {fwd / rows[0][3]:.1f} |")


if __name__ == "__main__":
    main()
