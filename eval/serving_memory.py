"""KV-cache memory per token on paper, for serving geometries (docs/serving.md).

kvquant rows come from :func:`kvquant.cache.kv_bytes_per_token` — the accounting a live
``KVQuantCache`` matches byte for byte (tests/test_serving_accounting.py) — for the shipped
configurations ``lambda-lloyd@K/V`` (configs/default.yaml, 3bit.yaml, 2bit.yaml): pre-RoPE keys,
min–max per channel over groups of G = 128 tokens with 8-bit (mid, half), 1 exact sink token,
keys at K effective bits, values V-bit INT per token with 8-bit (mid, half); exact tokens in
fp16/bf16.

The key code budget is the one the configs calibrate: ``CodebookConfig.code_bits(K, head_dim,
--calib-seqlen)`` (K effective bits at the calibration length, 2048). That budget does not depend
on head_dim (scales cost 2·8/G bits per entry and the sink 16/seqlen for any D), so the SmolLM2
(D = 64) targets carry over to D = 128 as budgets — but the *allocation* (which channel gets how
many levels) and its quality were only calibrated on SmolLM2; nothing here is measured on an 8B or
70B model. ``key_code_bits`` is taken equal to the budget, i.e. the 3- and 5-level channels'
padding to whole words is not counted (levels_size(128, 3) = 26 bytes, 1.625 bits/code vs the
1.6 the budget counts; levels_size(128, 5) = 42 bytes, 2.625 vs 2.33); ``--codebooks FILE``
prints what that padding costs on a real allocation.

Reference rows are upstream vLLM's page-size formulas per token (``AttentionSpec.page_size_bytes
/ block_size``, vllm/v1/kv_cache_interface.py): fp16/bf16 2·H·D·2 bytes per layer, fp8 2·H·D,
int8/fp8 per-token-head 2·H·D + 2·H·4 (float32 scales), nvfp4 2·H·(D/2 + D/16).

Usage:  python eval/serving_memory.py [--seqlens 8192,32768] [--gib 40] [--codebooks out/default.safetensors]
Prints markdown tables; computes in well under a second (no model is loaded).
"""

from __future__ import annotations

import argparse
import sys

from kvquant.cache import kv_bytes_per_token
from kvquant.codebooks import CodebookConfig

#: (name, layers, KV heads, head_dim): Llama-3-8B and Llama-3-70B attention geometry (GQA, 8 KV heads).
GEOMETRIES = [("Llama-3-8B-like", 32, 8, 128), ("Llama-3-70B-like", 80, 8, 128)]
#: The shipped configurations: (row, key effective bits at the calibration length, value bits).
SHIPPED = [("kvquant 4-bit `lambda-lloyd@3.65/4`", 3.65, 4), ("kvquant 3-bit `lambda-lloyd@2.65/3`", 2.65, 3),
           ("kvquant 2-bit `lambda-lloyd@1.65/2`", 1.65, 2)]
#: configs/*.yaml: channel-group, G 128, sink 1, 8-bit scales, pre-RoPE, budget over the keys.
CONFIG = CodebookConfig("lambda-lloyd", 8, 8, "channel-group", 128, 1, rope="pre", scale_bits=8, budget_sides="k")


def upstream_rows(layers: int, heads: int, d: int) -> list[tuple[str, float]]:
    """(row, bytes per token) of vLLM's own KV cache dtypes: page_size_bytes / block_size."""
    per_layer = {
        "fp16 / bf16 (`auto`)": 2 * heads * d * 2,
        "fp8 (`fp8`, per-tensor scale)": 2 * heads * d,
        "int8/fp8 `*_per_token_head`": 2 * heads * d + 2 * heads * 4,
        "`nvfp4` (fp4 + fp8 scale per 16)": 2 * heads * (d // 2 + d // 16),
    }
    return [(name, layers * b) for name, b in per_layer.items()]


def kvquant_rows(layers: int, heads: int, d: int, seqlen: int, calib_seqlen: int) -> list[tuple[str, float, float]]:
    """(row, key code bits, bytes per token) of the shipped configurations at ``seqlen``."""
    out = []
    for name, k_eff, bits_v in SHIPPED:
        code = CONFIG.code_bits(k_eff, d, calib_seqlen)
        out.append((name, code, kv_bytes_per_token(CONFIG, code, bits_v, d, heads, layers, seqlen)))
    return out


def table(seqlens: list[int], gib: float, calib_seqlen: int) -> str:
    budget = gib * 2**30
    head = ["geometry", "KV cache"]
    for t in seqlens:
        head += [f"bytes/token @{t}", f"bits/entry @{t}", f"× fp16 @{t}", f"tokens in {gib:g} GiB @{t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for geo, layers, heads, d in GEOMETRIES:
        fp16 = 2 * layers * heads * d * 2
        rows: dict[str, list[float]] = {name: [b] * len(seqlens) for name, b in upstream_rows(layers, heads, d)}
        for i, t in enumerate(seqlens):
            for name, _, b in kvquant_rows(layers, heads, d, t, calib_seqlen):
                rows.setdefault(name, [0.0] * len(seqlens))[i] = b
        for name, per_t in rows.items():
            cells = [geo, name]
            for b in per_t:
                cells += [f"{b:,.0f}", f"{16 * b / fp16:.3f}", f"{b / fp16:.3f}", f"{int(budget // b):,}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tail_table(seqlen: int, calib_seqlen: int) -> str:
    """The newest incomplete group held exact: bytes/token at ``seqlen`` (whole groups) and at
    ``seqlen + 127`` (127 exact tokens, the most there can be)."""
    lines = [f"| geometry | KV cache | key code bits | bytes/token @{seqlen} | @{seqlen + 127} (127 exact) | Δ |",
             "|---|---|---|---|---|---|"]
    for geo, layers, heads, d in GEOMETRIES:
        full = kvquant_rows(layers, heads, d, seqlen, calib_seqlen)
        tail = kvquant_rows(layers, heads, d, seqlen + 127, calib_seqlen)
        for (name, code, a), (_, _, b) in zip(full, tail):
            lines.append(f"| {geo} | {name} | {code:.4f} | {a:,.1f} | {b:,.1f} | {100 * (b / a - 1):+.1f}% |")
    return "\n".join(lines)


def packing_report(path: str, calib_seqlen: int) -> str:
    """What packing costs on a real allocation (``path``'s codebooks, and the other shipped
    targets rebuilt from its statistics as eval/deployed.py does): packed code bits per key
    entry, Σ levels_size(G, n)·8 / (G · channels), vs the allocation's budget and its mean_bits
    (3 and 5 levels counted at 1.6 and 2.33 bits); and the spread of one group's key record
    over layers (Σ over a layer's heads and channels of levels_size(G, n) bytes) — a paged cache
    whose pages are the same size in every layer (vLLM's) pads each layer's record to the
    largest, which costs (max − mean)·8 / (G · H · D) bits per key entry."""
    from kvquant.codebooks import Codebooks
    from kvquant.core.packing import level_bits, levels_size

    books = Codebooks.load(path)
    fp = books.fingerprint
    lines = [f"codebooks {path} ({fp.name_or_path or fp.model_type}, head_dim {fp.head_dim}, G {books.k.group}, "
             f"method {books.config.method})", "",
             f"| key effective bits @{calib_seqlen} | code budget | mean_bits | packed bits "
             "| channels with 3 / 5 levels | key record bytes per layer: min / mean / max "
             "| padded to the largest layer: + bits/key entry |",
             "|---|---|---|---|---|---|---|"]
    for _, k_eff, _ in SHIPPED:
        want = books.config.code_bits(k_eff, fp.head_dim, calib_seqlen)
        b = books if abs(books.config.budget - want) < 1e-5 else books.at_effective_bits(k_eff, calib_seqlen)
        vals, counts = b.k.channel_levels.flatten().unique(return_counts=True)
        n_ch, g = int(counts.sum()), b.k.group
        packed = sum(levels_size(g, int(n)) * int(c) for n, c in zip(vals, counts)) * 8 / (g * n_ch)
        mean = sum(level_bits(int(n)) * int(c) for n, c in zip(vals, counts)) / n_ch
        share = {int(n): int(c) / n_ch for n, c in zip(vals, counts)}
        levels = b.k.channel_levels  # (L, H, D)
        record = [sum(levels_size(g, int(n)) for n in layer.flatten().tolist()) for layer in levels]
        mean_rec = sum(record) / len(record)
        pad = (max(record) - mean_rec) * 8 / (g * levels[0].numel())
        lines.append(f"| {k_eff:g} | {b.config.budget:.4f} | {mean:.4f} | {packed:.4f} | "
                     f"{share.get(3, 0):.1%} / {share.get(5, 0):.1%} | {min(record):,} / {mean_rec:,.1f} / "
                     f"{max(record):,} | +{pad:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="8192,32768", help="sequence lengths (tokens held per sequence)")
    p.add_argument("--gib", type=float, default=40.0, help="KV memory for the tokens-that-fit column (GiB)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="length the effective-bits targets are set at")
    p.add_argument("--codebooks", default=None, help="a calibrated file: report the 3/5-level packing overhead")
    a = p.parse_args(argv)
    seqlens = [int(s) for s in a.seqlens.split(",")]
    print(f"`python eval/serving_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`"))
    print()
    print(table(seqlens, a.gib, a.calib_seqlen))
    print()
    print(tail_table(seqlens[0], a.calib_seqlen))
    if a.codebooks:
        print()
        print(packing_report(a.codebooks, a.calib_seqlen))


if __name__ == "__main__":
    main()
