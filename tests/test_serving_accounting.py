"""kvquant.cache.kv_bytes_per_token — the memory accounting on paper (docs/serving.md) — equals
what a live KVQuantCache holds.

Tiny Llama (2 layers, 2 KV heads, head_dim 16; conftest) in bfloat16, so that exact tokens cost
the 16 bits the accounting assumes. Codebooks: pre-RoPE, channel-group (G = 8), 8-bit scales,
1 exact sink, code bits allocated over channels (so channels of 2, 3, 4, 5, 8 … levels).

What the function does not count, and the test accounts for explicitly: the rotation plan that
decoding from codes keeps per layer for pre-RoPE keys (an int64 base position per group and row,
and one (r/2, G) float32 cos/sin pair per cache). The int32 positions stored after left padding
are not exercised (rows here are unpadded, so none are stored).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_model, random_ids
from test_cache import calibrated

from kvquant.cache import kv_bytes_per_token, make_cache
from kvquant.hf.compat import cache_kwargs
from kvquant.evaluation.generation import kv_bits
from kvquant.core.packing import levels_size, packed_size

L, H, D, G = 2, 2, 16, 8  # conftest's Llama: layers, KV heads, head_dim; the group here


def _packed_key_bits(books) -> float:
    """Packed code bits per key entry of complete groups, mean over layers, heads and channels:
    Σ levels_size(G, n) over every (layer, head, channel) · 8 / (L·G·H·D)."""
    levels = books.k.channel_levels.flatten().tolist()
    return sum(levels_size(G, int(n)) for n in levels) * 8 / (L * G * H * D)


def _plan_bytes(cache) -> int:
    """Bytes of the rotation plans the layers hold (each storage once, as memory_bytes counts)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (layer._plan.tensors() if layer._plan is not None else []):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


@pytest.mark.parametrize("bits_v", [2, 4])
def test_bytes_per_token_equal_the_live_cache(bits_v):
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=G, sink=1, scale_bits=8, rope="pre",
                       budget=3.0, budget_sides="k")
    assert books.k.channel_levels.unique().numel() > 1  # allocated: several level counts
    model = model.to(torch.bfloat16)
    cache = make_cache(model, books, bits_v=bits_v)
    kbits = _packed_key_bits(books)
    b, ids = 2, random_ids(2, 25)

    with torch.no_grad():  # prefill 20 tokens: 2 complete groups, 4 exact newest tokens, 1 sink
        model(ids[:, :20], **cache_kwargs(cache), use_cache=True)
    paper = kv_bytes_per_token(books.config, kbits, bits_v, D, H, L, 20)
    assert cache.bytes_per_token() == pytest.approx(paper, rel=1e-12)
    assert kv_bits(cache)[1] == pytest.approx(paper, rel=1e-12)
    assert kv_bits(cache)[0] == pytest.approx(16 * paper / cache.fp16_bytes_per_token(), rel=1e-12)

    from kvquant.kernels import cpu as cpu_kernels

    ok, why = cpu_kernels.available()
    if not ok:
        pytest.skip(f"the C decode kernel is not available here ({why}): no rotation plan to count")
    with torch.no_grad():  # 5 decoding steps read from the codes; the third completes group 3
        for t in range(20, 25):
            model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
    assert cache.reads_codes()
    paper = kv_bytes_per_token(books.config, kbits, bits_v, D, H, L, 25)
    plan = _plan_bytes(cache)
    assert plan > 0  # the only difference: rotation plans, (B, m) int64 per layer + shared cos/sin
    assert cache.bytes_per_token() == pytest.approx(paper + plan / (b * 25), rel=1e-12)

    # the steady state per quantized token: whole groups, no sink
    assert kv_bytes_per_token(replace(books.config, sink=0), kbits, bits_v, D, H, L, 3 * G) == pytest.approx(
        cache.quantized_bytes_per_token(), rel=1e-12)


def test_static_norm_and_the_formula_by_hand():
    """Static per-head tables (no groups): every token held as codes, the sinks' exact copies on
    top; and one group-mode case written out by hand."""
    model = make_model("llama")
    books = calibrated(model, sink=2)  # norm "head", 4-bit keys
    model = model.to(torch.bfloat16)
    cache = make_cache(model, books, bits_v=4)
    with torch.no_grad():
        model(random_ids(2, 11), **cache_kwargs(cache), use_cache=True)
    kbits = packed_size(D, 4) * 8 / D
    assert cache.bytes_per_token() == pytest.approx(kv_bytes_per_token(books.config, kbits, 4, D, H, L, 11), rel=1e-12)

    # G = 128, D = 128, 8-bit scales, sink 1, 3 code bits, 4-bit values, 200 tokens: 128 as codes,
    # 72 exact (+1 sink copy); per layer and head
    cfg = replace(books.config, norm="channel-group", group=128, sink=1, scale_bits=8)
    keys = (128 * 128 * 3 / 8 + 2 * 128) + (72 + 1) * 128 * 2  # codes + one group's mid/half + exact
    values = 128 * (64 + 2) + (72 + 1) * 128 * 2
    assert kv_bytes_per_token(cfg, 3.0, 4, 128, 8, 32, 200, tail="exact") == pytest.approx(32 * 8 * (keys + values) / 200,
                                                                                      rel=1e-12)
    # the default INT8 tail: the 72 newest keys and values at 128 + 2 bytes each instead of 256
    int8 = 32 * 8 * (keys + values - 2 * 72 * (256 - 130)) / 200
    assert kv_bytes_per_token(cfg, 3.0, 4, 128, 8, 32, 200) == pytest.approx(int8, rel=1e-12)
    with pytest.raises(ValueError, match="seqlen"):
        kv_bytes_per_token(cfg, 3.0, 4, 128, 8, 32, 100)  # no complete group yet
    assert math.isfinite(kv_bytes_per_token(cfg, 3.0, 4, 128, 8, 32, 128))
