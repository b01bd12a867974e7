"""Decode attention from packed codes: the torch reference against dequantize-then-SDPA, and the
Triton kernel (CPU: ``TRITON_INTERPRET=1``) against the reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kvquant.compat import cache_kwargs
from kvquant.decode import (
    decode_attention_reference,
    dequantize_keys,
    dequantize_values,
    lookup,
    pack,
    unpack,
)
from kvquant.packing import packed_size


def _codes(shape, bits, g):
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 16, 24])
def test_packing_matches_a_bit_by_bit_reference(bits, n):
    """pack/unpack (the fast uint8 path for bits dividing 8, the word path otherwise) against
    little-endian bit packing written out bit by bit."""
    g = torch.Generator().manual_seed(bits * 100 + n)
    c = _codes((2, 3, 5, n), bits, g)
    p = pack(c, bits)
    assert p.shape[-1] == packed_size(n, bits)
    for row, packed in zip(c.reshape(-1, n).tolist(), p.reshape(-1, p.shape[-1]).tolist()):
        stream = [(code >> i) & 1 for code in row for i in range(bits)]
        stream += [0] * (8 * len(packed) - len(stream))
        assert packed == [sum(stream[8 * j + i] << i for i in range(8)) for j in range(len(packed))]
    assert torch.equal(unpack(p, bits, n), c)


def test_lookup_per_head_and_shared():
    g = torch.Generator().manual_seed(0)
    c = _codes((2, 3, 4, 5), 4, g)
    table = torch.randn(3, 16, generator=g)
    out = lookup(c, table)
    for h in range(3):
        assert torch.equal(out[:, h], table[h][c[:, h].long()])
    assert torch.equal(lookup(c, table[0]), table[0][c.long()])


def random_state(b=2, hkv=2, s=37, d=16, bits=4, bits_v=None, seed=0, per_head_v=False):
    """Random packed codes and tables in the cache's layout."""
    bits_v = bits if bits_v is None else bits_v
    g = torch.Generator().manual_seed(seed)
    kk, kv = 2**bits, 2**bits_v
    return dict(
        k_codes=pack(_codes((b, hkv, s, d), bits, g), bits),
        k_centers=torch.randn(hkv, kk, generator=g).sort(-1).values,
        k_offset=torch.randn(hkv, d, generator=g),
        k_scale=torch.rand(hkv, d, generator=g) + 0.5,
        v_codes=pack(_codes((b, hkv, s, d), bits_v, g), bits_v),
        v_centers=(torch.randn(hkv, kv, generator=g) if per_head_v else torch.randn(kv, generator=g)).sort(-1).values,
        v_scale=(torch.rand(b, hkv, s, generator=g) + 0.5).half(),
        bits=bits,
        bits_v=bits_v,
    )


def sdpa_on_dequantized(q, st, causal=True, mask=None, scaling=None):
    d = q.shape[-1]
    k = dequantize_keys(st["k_codes"], st["k_centers"], st["k_offset"], st["k_scale"], st["bits"], d)
    v = dequantize_values(st["v_codes"], st["v_centers"], st["v_scale"], st["bits_v"], d)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    tq, s = q.shape[2], k.shape[2]
    allowed = torch.ones(tq, s, dtype=torch.bool)
    if causal:
        allowed = torch.arange(s)[None, :] <= torch.arange(tq)[:, None] + (s - tq)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=allowed, scale=scaling)


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("bits,bits_v", [(4, 4), (2, 2), (4, 2), (3, 8)])
def test_reference_equals_dequantize_then_sdpa(tq, bits, bits_v):
    st = random_state(bits=bits, bits_v=bits_v, seed=bits * 10 + bits_v)
    q = torch.randn(2, 8, tq, 16, generator=torch.Generator().manual_seed(tq))  # GQA: 8 q / 2 kv heads
    out = decode_attention_reference(q, **st)
    torch.testing.assert_close(out, sdpa_on_dequantized(q, st), atol=1e-5, rtol=1e-5)
    out = decode_attention_reference(q, **st, scaling=0.3, causal=False)
    torch.testing.assert_close(out, sdpa_on_dequantized(q, st, causal=False, scaling=0.3), atol=1e-5, rtol=1e-5)


def test_reference_with_padding_mask_and_half_queries():
    st = random_state(seed=4)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[1, :, :, :5] = False  # left padding of row 1
    out = decode_attention_reference(q, **st, attention_mask=mask)
    torch.testing.assert_close(out, sdpa_on_dequantized(q, st, mask=mask), atol=1e-5, rtol=1e-5)
    half = decode_attention_reference(q.half(), **st)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), sdpa_on_dequantized(q.half(), st), atol=2e-3, rtol=2e-3)
    none = torch.zeros_like(mask)
    assert torch.equal(decode_attention_reference(q, **st, attention_mask=none), torch.zeros_like(q))


def test_reference_on_a_real_cache_matches_sdpa_on_its_keys_and_values():
    """The codes a KVQuantCache holds decode to exactly the keys/values it returns."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvquant.cache import make_cache
    from kvquant.calibrate import capture_stats
    from kvquant.codebooks import CodebookConfig, Codebooks
    from kvquant.fingerprint import ModelFingerprint

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.2)).eval()
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    books = Codebooks.from_stats(capture_stats(model, ids, progress=False), CodebookConfig("lambda", 4, 4),
                                 ModelFingerprint.from_model(model))
    cache = make_cache(model, books, values="rms")  # the layout decode_attention_reference reads
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    q = torch.randn(2, 4, 1, 16)
    for layer in cache.layers:
        k, v = layer._materialize()
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch.testing.assert_close(decode_attention_reference(q, **layer.quantized_state()), ref, atol=1e-5, rtol=1e-5)


# --- Triton ---------------------------------------------------------------------------------
# On the CPU the kernel runs under Triton's interpreter, which needs TRITON_INTERPRET=1 before
# triton is first imported (torch/transformers import it), so the cases run in a subprocess.

TRITON_CASES = [
    # b, h, hkv, tq, s, d, bits, bits_v, splits, q dtype
    (2, 4, 2, 1, 37, 16, 4, 4, None, "float32"),
    (1, 8, 2, 1, 150, 32, 4, 4, 3, "float32"),
    (1, 8, 2, 3, 150, 32, 4, 4, 2, "float32"),  # several query tokens, causal among them
    (2, 6, 2, 1, 70, 24, 4, 4, 2, "float32"),  # head_dim not a power of two
    (1, 4, 4, 2, 65, 16, 2, 2, 2, "float32"),  # 2 bits, no GQA, per-head value tables
    (1, 4, 1, 1, 40, 16, 4, 2, 1, "float32"),  # 4-bit keys, 2-bit values, MQA
    (1, 4, 2, 1, 33, 16, 8, 8, 2, "float32"),
    (1, 4, 2, 1, 30, 16, 1, 2, 2, "float32"),  # 1-bit keys
    (1, 4, 2, 1, 50, 16, 4, 4, 2, "float16"),  # fp16 operands in the dots
]


def run_triton_cases() -> list[float]:
    """Max |kernel − reference| per case, relative to the reference's max |value|."""
    from kvquant import triton_decode

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    errs = []
    for b, h, hkv, tq, s, d, bits, bits_v, splits, dtype in TRITON_CASES:
        st = random_state(b, hkv, s, d, bits, bits_v, seed=s + d, per_head_v=(hkv == 4))
        q = torch.randn(b, h, tq, d, generator=torch.Generator().manual_seed(s)).to(getattr(torch, dtype))
        ref = decode_attention_reference(q.float(), **st)
        dst = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        out = triton_decode.decode_attention(q.to(dev), **dst, num_splits=splits, block_n=16)
        assert out.dtype == q.dtype and out.shape == (b, h, tq, d)
        errs.append(float((out.float().cpu() - ref).abs().max() / ref.abs().max()))
    return errs


def test_triton_kernel_matches_reference():
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton is not importable: {e}")
    if torch.cuda.is_available():
        errs = run_triton_cases()
    else:
        import json
        import subprocess
        import sys
        from pathlib import Path

        code = (
            "import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "import test_decode as t; from kvquant import triton_decode as td; ok, why = td.available(); "
            "print(json.dumps({'ok': ok, 'why': why, 'errs': t.run_triton_cases() if ok else []}))"
        )
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if not res["ok"]:
            pytest.skip(res["why"])
        errs = res["errs"]
    tols = [3e-3 if case[-1] == "float16" else 1e-5 for case in TRITON_CASES]
    bad = [(case, e) for case, e, tol in zip(TRITON_CASES, errs, tols) if not e <= tol]
    assert len(errs) == len(TRITON_CASES) and not bad, bad


def test_triton_unavailable_reason_is_clear(monkeypatch):
    try:
        from kvquant import triton_decode as td
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"kvquant.triton_decode does not import: {e}")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernel is available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = td.available()
    assert not ok and why
    with pytest.raises(RuntimeError, match="unavailable"):
        td.decode_attention(torch.zeros(1, 1, 1, 16), **random_state(1, 1, 4, 16))
