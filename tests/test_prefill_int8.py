"""Prefill attention with Q·Kᵀ from INT8 codes (kvquant.kernels.prefill_cpu, kvquant.hf.prefill): the
kernel equals its torch reference (the simulated path) — to float rounding where the reference's
arithmetic is the kernel's, to bf16 rounding of the probabilities elsewhere —, on its AVX-512 VNNI
path where this CPU has one and on its portable C path everywhere; wrapped models of every family
run their prefills through it, windows included, and fall back to SDPA with a warning on padding."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import EXPECTED_WINDOWS, FAMILIES, make_model, random_ids

import kvquant
from kvquant.core.int8_rows import decode_int8_rows, encode_int8_rows
from kvquant.hf.compat import cache_kwargs
from kvquant.kernels import prefill_cpu

pytestmark = pytest.mark.skipif(not prefill_cpu.available()[0], reason=prefill_cpu.available()[1])


@pytest.fixture(params=["native", "portable"])
def kernel_path(request, monkeypatch):
    """The kernel as built for this CPU, and built with no intrinsics (its portable C)."""
    if request.param == "portable":
        monkeypatch.setattr(prefill_cpu, "cpu_features", lambda: set())
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        prefill_cpu._library.cache_clear()
        assert not prefill_cpu.vnni() and not any(f.startswith("-mavx") for f in prefill_cpu._flags())
    yield request.param
    monkeypatch.undo()
    prefill_cpu._library.cache_clear()


def _qkv(b: int, h: int, hk: int, t: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hk, t, d, generator=g) + 3 * torch.randn(1, 1, 1, d, generator=g)  # a common offset
    v = torch.randn(b, hk, t, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("shape,window", [((2, 4, 2, 2, 64), 0), ((2, 4, 2, 32, 64), 0), ((1, 3, 1, 300, 64), 0),
                                          ((2, 4, 2, 130, 32), 0), ((1, 2, 2, 200, 16), 24), ((1, 2, 1, 100, 16), 1)])
def test_the_kernel_equals_its_reference_to_float_rounding(kernel_path, shape, window):
    """The same integer dots, float products and bf16 probabilities against the same running max:
    outputs equal up to summation order (GQA, head_dim 16–64, one block of keys or many, windows)."""
    q, k, v = _qkv(*shape)
    out = prefill_cpu.prefill_attention(q, k, v, shape[-1] ** -0.5, window)
    ref = prefill_cpu.reference_attention(q, k, v, shape[-1] ** -0.5, window)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out - ref).abs().max() < 1e-4 * v.abs().max()


def test_the_codes_are_of_smoothed_balanced_entries_whose_attention_is_exact_attention():
    """The codes hold q/α and α·(k − k̄) per token: their dot products are q·k less q·k̄ (the same for
    every key of a query), so attention over them is attention over q and k; the channels' ranges
    are balanced between the two sides; the reference is near exact attention, and without the
    smoothing (keys offset by several σ per channel) the same INT8 codes would not be."""
    q, k, v = _qkv(1, 4, 2, 50, 64)
    k = k + 5 * torch.randn(1, 2, 1, 64)
    c_q, s_q, c_k, s_k = prefill_cpu.smoothed_codes(q, k)
    assert c_q.dtype == c_k.dtype == torch.int8 and s_q.dtype == s_k.dtype == torch.float16
    q_hat, k_hat = decode_int8_rows(c_q, s_q), decode_int8_rows(c_k, s_k).repeat_interleave(2, 1)
    assert k_hat.mean(2).abs().max() < 0.05 * k_hat.abs().max()  # centred
    q_range, k_range = q_hat.abs().amax(2).view(1, 2, 2, 64).amax(2), k_hat[:, ::2].abs().amax(2)
    assert torch.allclose(q_range, k_range, rtol=0.02)  # balanced per KV head and channel
    vr = v.repeat_interleave(2, 1)
    exact = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), vr, is_causal=True, scale=0.125)
    sim = F.scaled_dot_product_attention(q_hat, k_hat, vr, is_causal=True, scale=0.125)
    assert (sim - exact).abs().max() < 0.05
    assert (prefill_cpu.reference_attention(q, k, v, 0.125) - exact).abs().max() < 0.05
    c_k8, s_k8 = encode_int8_rows(k)  # the keys' own codes, offset and all
    raw = F.scaled_dot_product_attention(decode_int8_rows(*encode_int8_rows(q)), decode_int8_rows(c_k8, s_k8)
                                         .repeat_interleave(2, 1), vr, is_causal=True, scale=0.125)
    assert (raw - exact).abs().max() > 2 * (sim - exact).abs().max()


def test_half_inputs_and_threads_give_the_same_output():
    q, k, v = _qkv(1, 4, 2, 100, 64, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefill_cpu.prefill_attention(q, k, v, 0.125)
        torch.set_num_threads(2)
        two = prefill_cpu.prefill_attention(q, k, v, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # a task's sums do not depend on the thread that runs it
    assert (one - prefill_cpu.reference_attention(q, k, v, 0.125)).abs().max() < 1e-4 * v.float().abs().max()


def test_bad_shapes_are_refused_with_the_reason():
    q, k, v = _qkv(1, 3, 2, 8, 64)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        prefill_cpu.prefill_attention(q, k, v, 0.125)
    q, k, v = _qkv(1, 2, 1, 8, 24)
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        prefill_cpu.prefill_attention(q, k, v, 0.125)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_prefills_run_the_kernel_with_each_layers_window(family, monkeypatch):
    """Every layer's prefill goes through the kernel with its own sliding window and scaling, each
    call equal to the reference (the simulated int8 prefill) on the same inputs; the logits move
    from exact attention's, by less than a tenth of their range."""
    model = make_model(family)
    ids = random_ids(2, 40)
    windows, real = [], prefill_cpu.prefill_attention

    def spy(q, k, v, scale, window=0):
        windows.append(window)
        out = real(q, k, v, scale, window)
        assert (out - prefill_cpu.reference_attention(q, k, v, scale, window)).abs().max() < 1e-4 * v.abs().max()
        return out

    with torch.no_grad():
        exact = model(ids).logits
        kvquant.wrap(model, prefill="int8")
        monkeypatch.setattr(prefill_cpu, "prefill_attention", spy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(ids).logits
    assert windows == [w or 0 for w in EXPECTED_WINDOWS[family]]
    assert 0 < (out - exact).abs().max() < 0.1 * exact.abs().max()


def test_off_mode_stays_bit_identical_and_padding_falls_back_with_a_warning():
    model = make_model("llama")
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        exact = model(ids, attention_mask=mask).logits
        kvquant.wrap(model)
        assert torch.equal(model(ids, attention_mask=mask).logits, exact)
        kvquant.wrap(model, prefill="int8")
        with pytest.warns(UserWarning, match="padding is attended by SDPA"):
            padded = model(ids, attention_mask=mask).logits
        assert torch.equal(padded, exact)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per model
            model(ids, attention_mask=mask)
        kvquant.unwrap(model)
        assert torch.equal(model(ids, attention_mask=mask).logits, exact)


def test_generate_prefills_through_the_kernel_then_decodes_from_the_cache():
    from test_cache import calibrated

    model = make_model("llama")
    books = calibrated(model)
    ids = random_ids(1, 40)
    seen, real = [], prefill_cpu.prefill_attention
    with torch.no_grad():
        kvquant.wrap(model, prefill="int8")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(prefill_cpu, "prefill_attention", lambda *a: seen.append(a[0].shape[2]) or real(*a))
            out = model.generate(ids, **cache_kwargs(kvquant.make_cache(model, books)), max_new_tokens=6, do_sample=False)
    assert seen == [40, 40] and out.shape == (1, 46)


def test_wrap_refuses_an_unknown_prefill():
    with pytest.raises(ValueError, match="prefill must be one of"):
        kvquant.wrap(make_model("llama"), prefill="fp8")
