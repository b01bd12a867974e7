"""KVQuantCache: decoding with the quantized cache gives the simulated path's logits; generate()
(greedy, sampling, beam search, left padding), sliding windows, memory accounting, crop/reorder.

Tiny random models (2 layers, 4 query / 2 KV heads, head_dim 16 unless stated), codebooks from
statistics captured on them (method ``lambda``, 4 bits). The caches hold the newest incomplete
group exact (``tail="exact"``, the simulated path's rule) but where a test says otherwise; the
default INT8 tail is checked against them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SEQ, WINDOW, make_model, random_ids

import kvquant
from kvquant.core import density as dens
from kvquant.core import scalar as cb
from kvquant.cache import (
    KVQuantCache,
    KVQuantSlidingLayer,
    make_cache,
    query_quantizer,
    value_codebook,
)
from kvquant.hf.calibrate import capture_stats
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.hf.compat import cache_kwargs
from kvquant.io.fingerprint import ModelFingerprint

SLIDING = {"llama": [False, False], "mistral": [True, True], "gemma3": [True, False]}


def books_for(model: torch.nn.Module, method: str = "lambda", bits: int = 4) -> Codebooks:
    stats = capture_stats(model, random_ids(2, 16, seed=7), progress=False)
    return Codebooks.from_stats(stats, CodebookConfig(method, bits, bits), ModelFingerprint.from_model(model))


def setup(family: str, **overrides) -> tuple[torch.nn.Module, Codebooks]:
    model = make_model(family, **overrides)
    return model, books_for(model)


@torch.no_grad()
def stepwise_logits(model, ids, cache, prefill: int = 1, attention_mask=None) -> torch.Tensor:
    """Logits of every position: ``prefill`` tokens in one call, then one token per call."""
    outs = [model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True,
                  attention_mask=None if attention_mask is None else attention_mask[:, :prefill]).logits]
    for t in range(prefill, ids.shape[1]):
        am = None if attention_mask is None else attention_mask[:, : t + 1]
        outs.append(model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True, attention_mask=am).logits)
    return torch.cat(outs, dim=1)


@torch.no_grad()
def full_logits(model, ids, attention_mask=None) -> torch.Tensor:
    return model(ids, attention_mask=attention_mask, use_cache=False).logits


# --- the value codebook ---------------------------------------------------------------------


def test_value_codebook_is_companded_rho0_density():
    book = value_codebook(4)
    ref = cb.compand(dens.lambda_star_density(0.0), 16)
    assert np.array_equal(book.centers, ref.centers) and np.array_equal(book.boundaries, ref.boundaries)
    assert np.allclose(book.centers, -book.centers[::-1], atol=1e-9)  # symmetric
    # exp(-u²/6) is the N(0, 3) shape: the median of |u| sits near 3^½·0.674
    assert 0.9 < float(np.median(np.abs(cb.compand(dens.lambda_star_density(0.0), 256).centers))) < 1.5


# --- consistency with the simulated path ----------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("prefill", [1, 7])
def test_decoding_matches_simulated_forward(family, prefill):
    """Values exact: the cache only changes what the attention function would have done anyway.
    The reference is the simulated quantizer fed the same way (a DynamicCache, the same prefill and
    one-token steps): a full forward computes the queries with other matmul shapes, and a last-bit
    difference can move a query across a code boundary on some CPUs."""
    from transformers import DynamicCache

    model, books = setup(family)
    ids = random_ids()
    kvquant.wrap(model, books)
    ref = stepwise_logits(model, ids, DynamicCache(config=model.config), prefill)
    cache = make_cache(model, books, tail="exact", quantize_values=False)
    assert cache.is_sliding == SLIDING[family]
    got = stepwise_logits(model, ids, cache, prefill)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # sliding layers keep only window-1 tokens, full layers all of them
    held = [layer.held_tokens for layer in cache.layers]
    assert held == [WINDOW - 1 if s else SEQ for s in SLIDING[family]]
    assert cache.get_seq_length() == SEQ

    # the same with queries-only quantization in the model (keys come quantized from the cache)
    kvquant.wrap(model, query_quantizer(books, model))
    got_q = stepwise_logits(model, ids, make_cache(model, books, tail="exact", quantize_values=False), prefill)
    torch.testing.assert_close(got_q, ref, atol=1e-4, rtol=0)


def test_requantizing_cached_keys_is_identity():
    """Nearest-centre codebooks map a dequantized key (a center) back to the same center."""
    model, books = setup("llama")
    cache = make_cache(model, books, tail="exact")
    with torch.no_grad():
        model(random_ids(), **cache_kwargs(cache), use_cache=True)
    for layer_idx, layer in enumerate(cache.layers):
        k, _ = layer._dequantized()
        assert torch.equal(books.k.apply(k, layer_idx), k)


def test_cached_keys_are_bit_identical_to_simulated_keys():
    model, books = setup("llama")
    cache = make_cache(model, books, tail="exact")
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 9, 16, generator=g) * 3
    v = torch.randn(2, 2, 9, 16, generator=g)
    for layer_idx, layer in enumerate(cache.layers):
        kk, _ = layer.update(k[:, :, :5], v[:, :, :5])
        kk, _ = layer.update(k[:, :, 5:], v[:, :, 5:])
        assert torch.equal(kk, books.k.apply(k, layer_idx))


def _expected_values(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token RMS scale in fp16, numpy codebook encode/decode (independent of the cache)."""
    book = value_codebook(bits)
    scale = v.float().pow(2).mean(-1).sqrt().half().float()
    x = (v.float() / scale[..., None]).numpy()
    return torch.from_numpy(book.decode(book.encode(x))).float() * scale[..., None]


@pytest.mark.parametrize("sink,residual", [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_layer_holds_sink_quantized_residual(sink, residual):
    model, books = setup("llama")
    cache = make_cache(model, books, tail="exact", sink=sink, residual=residual, values="rms")  # the RMS-scaled layout below
    layer = cache.layers[1]
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 2, 11, 16, generator=g) * 2 + 0.5
    v = torch.randn(2, 2, 11, 16, generator=g)
    for lo, hi in [(0, 4), (4, 5), (5, 9), (9, 10), (10, 11)]:
        kk, vv = layer.update(k[:, :, lo:hi], v[:, :, lo:hi])
        n = hi
        exact = torch.zeros(n, dtype=torch.bool)
        exact[: min(sink, n)] = True
        exact[max(n - residual, 0) :] = True
        kq, vq = books.k.apply(k[:, :, :n], 1), _expected_values(v[:, :, :n], 4)
        ek = torch.where(exact[None, None, :, None], k[:, :, :n], kq)
        ev = torch.where(exact[None, None, :, None], v[:, :, :n], vq)
        assert torch.equal(kk, ek)
        torch.testing.assert_close(vv, ev, atol=1e-6, rtol=1e-6)
        assert layer.get_seq_length() == n
        # every token past the residual has a code slot, the sinks too (their exact copies, taken on arrival, laid over)
        assert layer.k_codes.shape[2] == max(n - residual, 0) and layer.sink_k.shape[2] == min(sink, n)


def test_residual_and_sink_tokens_are_exact_in_the_model():
    """With every token exact (sink or residual ≥ length), the cached model equals the model
    with quantized queries and exact keys and values."""
    from transformers import DynamicCache

    model, books = setup("llama")
    ids = random_ids()
    kvquant.wrap(model, query_quantizer(books, model))
    ref = stepwise_logits(model, ids, DynamicCache(config=model.config), prefill=3)  # the same matmul shapes
    for opts in (dict(residual=SEQ), dict(sink=SEQ), dict(sink=5, residual=SEQ - 5)):
        got = stepwise_logits(model, ids, make_cache(model, books, tail="exact", **opts), prefill=3)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # and fewer exact tokens change the result
    got = stepwise_logits(model, ids, make_cache(model, books, tail="exact", residual=2), prefill=3)
    assert (got - ref).abs().max() > 1e-3


# --- generate() -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_greedy_sampling_beam_match_simulated(family):
    model, books = setup(family)
    kvquant.wrap(model, books)
    prompt = random_ids(2, 6)
    kw = dict(max_new_tokens=8, min_new_tokens=8)

    def run(cache, **gen):
        torch.manual_seed(11)
        if cache is None:
            return model.generate(prompt, use_cache=False, **kw, **gen)
        return model.generate(prompt, **cache_kwargs(cache), **kw, **gen)

    for gen in (dict(do_sample=False), dict(do_sample=True, top_k=0), dict(num_beams=3, do_sample=False)):
        ref = run(None, **gen)
        got = run(make_cache(model, books, tail="exact", quantize_values=False), **gen)
        assert got.shape == (2, 14)
        assert torch.equal(got, ref), gen
    # with quantized values too: runs, and the prompt comes back
    for gen in (dict(do_sample=False), dict(do_sample=True), dict(num_beams=3, num_return_sequences=2)):
        out = run(make_cache(model, books, tail="exact", sink=1, residual=2), **gen)
        assert torch.equal(out[:: out.shape[0] // 2, :6], prompt)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batch_with_left_padding(family):
    model, books = setup(family)
    kvquant.wrap(model, books)
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    # step by step with padding == simulated full forward (padded query rows aside)
    ref = full_logits(model, ids, mask)
    got = stepwise_logits(model, ids, make_cache(model, books, tail="exact", quantize_values=False), prefill=5, attention_mask=mask)
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 3:], ref[1, 3:], atol=1e-4, rtol=0)
    # generate(): padded row == the same prompt alone, unpadded
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
    g_ref = model.generate(ids, use_cache=False, **kw)
    g = model.generate(ids, **cache_kwargs(make_cache(model, books, tail="exact", quantize_values=False)), **kw)
    assert torch.equal(g, g_ref)
    alone = model.generate(ids[1:, 3:], **cache_kwargs(make_cache(model, books, tail="exact", quantize_values=False)),
                           max_new_tokens=6, do_sample=False)
    assert torch.equal(alone[0, 6:], g[1, 9:])


# --- memory ---------------------------------------------------------------------------------


def _held_nbytes(layer) -> int:
    """Bytes of every tensor attribute of a layer except its static tables (found by walking
    the object, independently of the layer's own accounting)."""
    total = 0
    for name, t in vars(layer).items():
        if isinstance(t, torch.Tensor) and name not in ("keys", "values", "_sliding_window_tensor"):
            total += t.untyped_storage().nbytes()
    return total + sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def test_memory_per_token_head_dim_64():
    model, books = setup("llama", hidden_size=128, head_dim=64)
    b, s, layers, hkv, d = 2, 20, 2, 2, 64
    cache = make_cache(model, books, tail="exact")
    with torch.no_grad():
        model(random_ids(b, s), **cache_kwargs(cache), use_cache=True)
    per_head = d * 4 // 8 + d * 4 // 8 + 2  # key codes + value codes + fp16 value scale = 66 bytes
    assert cache.memory_bytes() == layers * b * hkv * s * per_head
    assert cache.memory_bytes() == sum(_held_nbytes(layer) for layer in cache.layers)
    assert cache.bytes_per_token() == layers * hkv * per_head == cache.quantized_bytes_per_token()
    fp16 = layers * hkv * d * 2 * 2
    assert cache.fp16_bytes_per_token() == fp16
    ratio = cache.bytes_per_token() / fp16
    assert ratio == pytest.approx(66 / 256) and ratio <= 0.30  # 25.8 % of fp16, metadata included
    assert cache.table_bytes() > 0  # static, per model

    # exact sink/residual tokens are counted in the model's dtype (float32 here); the sinks keep
    # their code slots too
    cache = make_cache(model, books, tail="exact", sink=2, residual=5)
    with torch.no_grad():
        model(random_ids(b, s), **cache_kwargs(cache), use_cache=True)
    exact = 2 * d * 4  # key + value, float32
    expect = layers * b * hkv * ((s - 5) * per_head + 7 * exact)
    assert cache.memory_bytes() == expect == sum(_held_nbytes(layer) for layer in cache.layers)
    assert cache.bytes_per_token() == pytest.approx(expect / (b * s))


def test_memory_counts_sliding_layers_window_only():
    model, books = setup("mistral")
    cache = make_cache(model, books, tail="exact")
    with torch.no_grad():
        model(random_ids(1, SEQ), **cache_kwargs(cache), use_cache=True)
    per_head = 8 + 8 + 2
    assert cache.memory_bytes() == 2 * 1 * 2 * (WINDOW - 1) * per_head
    assert cache.memory_bytes() == sum(_held_nbytes(layer) for layer in cache.layers)


# --- crop / reorder / batch ops ---------------------------------------------------------------


def test_crop_then_continue_equals_fresh_cache():
    model, books = setup("llama")
    kvquant.wrap(model, books)
    ids = random_ids()
    cache = make_cache(model, books, tail="exact")
    with torch.no_grad():
        model(ids[:, :10], **cache_kwargs(cache), use_cache=True)
        before = [layer._materialize() for layer in cache.layers]
        cache.crop(-3)
        assert cache.get_seq_length() == 7
        for (k, v), layer in zip(before, cache.layers):
            k2, v2 = layer._materialize()
            assert torch.equal(k2, k[:, :, :7]) and torch.equal(v2, v[:, :, :7])
        after = model(ids[:, 7:], **cache_kwargs(cache), use_cache=True).logits
        fresh = make_cache(model, books, tail="exact")
        model(ids[:, :7], **cache_kwargs(fresh), use_cache=True)
        ref = model(ids[:, 7:], **cache_kwargs(fresh), use_cache=True).logits
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=0)
    assert cache.memory_bytes() == fresh.memory_bytes()
    with pytest.raises(ValueError):
        cache.crop(2)
    assert cache.is_croppable and make_cache(model, books, tail="exact", residual=2).is_croppable  # crops keep what was served


def test_sliding_crop_with_past_recording():
    model, books = setup("mistral")
    cache = make_cache(model, books, tail="exact")
    cache.activate_past_recording()
    with torch.no_grad():
        model(random_ids(1, 10), **cache_kwargs(cache), use_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, KVQuantSlidingLayer) and layer.held_tokens == 10
    k_all, _ = layer._materialize()
    cache.crop(-2)
    assert cache.get_seq_length() == 8 and layer.held_tokens == WINDOW - 1
    k, _ = layer._materialize()
    assert torch.equal(k, k_all[:, :, 8 - (WINDOW - 1) : 8])
    # without past recording, cropping past the window is refused, as in transformers
    plain = make_cache(model, books, tail="exact")
    with torch.no_grad():
        model(random_ids(1, 10), **cache_kwargs(plain), use_cache=True)
    with pytest.raises(RuntimeError):
        plain.crop(-2)


def test_reorder_and_batch_ops():
    model, books = setup("llama")
    cache = make_cache(model, books, tail="exact", sink=1, residual=2)
    with torch.no_grad():
        model(random_ids(3, 8), **cache_kwargs(cache), use_cache=True)
    before = [layer._materialize() for layer in cache.layers]
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    for (k, v), layer in zip(before, cache.layers):
        k2, v2 = layer._materialize()
        assert torch.equal(k2, k[idx]) and torch.equal(v2, v[idx])
    cache.batch_select_indices(torch.tensor([0, 1]))
    cache.batch_repeat_interleave(2)
    for (k, v), layer in zip(before, cache.layers):
        k2, _ = layer._materialize()
        assert torch.equal(k2, k[torch.tensor([2, 2, 0, 0])])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0
    with torch.no_grad():  # usable again after reset
        model(random_ids(1, 4), **cache_kwargs(cache), use_cache=True)
    assert cache.get_seq_length() == 4


def test_make_cache_checks_the_codebooks():
    model, books = setup("llama")
    other = make_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="do not fit"):
        make_cache(other, books)
    cache = make_cache(model, books, tail="exact", bits_v=2)
    assert isinstance(cache, KVQuantCache)
    assert cache.options.bits_k == 4 and cache.options.bits_v == 2
    assert cache.quantized_bytes_per_token() == 2 * 2 * (8 + 4 + 2)


# --- codebooks with exact sinks, and the dynamic channel-group normalisation ----------------


def calibrated(model, **config) -> Codebooks:
    from kvquant.hf.calibrate import CalibrationConfig, calibrate

    return calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(CodebookConfig("lambda", 4, 4, **config)),
                     progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_codebook_sinks_with_query_quantizer_match_simulated(family):
    """Books with sink=2: the cache keeps 2 exact sinks by default, and the query quantizer
    finds the queries' absolute positions from the position_ids (a decoding step's single query
    token is not a sink)."""
    model = make_model(family)
    books = calibrated(model, sink=2)
    ids = random_ids()
    kvquant.wrap(model, books)
    ref = full_logits(model, ids)
    cache = make_cache(model, books, tail="exact", quantize_values=False)
    assert cache.options.sink == 2
    kvquant.wrap(model, query_quantizer(books, model))
    got = stepwise_logits(model, ids, cache, prefill=1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_group_mode_layer_holds_whole_groups():
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1, scale_bits=8)
    assert books.k.group == 4 and books.k.sink == 1
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 2, 15, 16, generator=g) * 2 + 0.5
    v = torch.randn(2, 2, 15, 16, generator=g)
    for residual in (0, 2):
        cache = make_cache(model, books, tail="exact", residual=residual)
        assert cache.options.group == 4 and cache.options.sink == 1 and cache.is_croppable
        layer = cache.layers[0]
        for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 10), (10, 15)]:
            kk, _ = layer.update(k[:, :, lo:hi], v[:, :, lo:hi])
            quantized = max(hi - residual, 0) // 4 * 4  # whole groups aligned at token 0 (the sink's slot included)
            assert layer.quantized_tokens == quantized and layer.k_codes.shape[2] == layer.k_mid.shape[2] == quantized // 4
            assert layer.k_mid.dtype == layer.k_half.dtype == torch.int8  # 8-bit scales as stored
            # sink exact, complete groups exactly as the simulated path, the rest exact
            torch.testing.assert_close(kk[:, :, :quantized], books.k.apply(k[:, :, :quantized], 0), atol=0, rtol=0)
            assert torch.equal(kk[:, :, quantized:], k[:, :, quantized:hi]) and torch.equal(kk[:, :, 0], k[:, :, 0])
            if not residual:  # the simulated path holds what the cache holds
                assert torch.equal(kk, books.k.apply(k[:, :, :hi], 0))
    # fp16 mid/half: the simulation uses them as stored too
    books = calibrated(model, norm="channel-group", group=4, sink=1)
    cache = make_cache(model, books, tail="exact")
    kk, _ = cache.layers[0].update(k, v)
    assert cache.layers[0].k_mid.dtype == torch.float16
    assert torch.equal(kk, books.k.apply(k, 0))


def test_group_mode_decoding_matches_causal_reference():
    """Group mode: the cache == transformers' fp DynamicCache with an attention that, at every
    step, applies the simulated quantizer to all keys so far (complete groups quantized, the
    sink and the incomplete group exact). Queries and values exact."""
    from transformers import DynamicCache

    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1, scale_bits=8)
    ids = random_ids(2, 13)

    def causal_keys(x, layer, side):
        return x if side == "q" else books.k.apply(x, layer)

    got = stepwise_logits(model, ids, make_cache(model, books, tail="exact", quantize_values=False), 2)
    with kvquant.wrapped(model, causal_keys):
        ref = stepwise_logits(model, ids, DynamicCache(config=model.config), 2)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # generate() runs (greedy, beam) with quantized values and queries-only quantization
    for gen in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        cache = make_cache(model, books, tail="exact")
        with kvquant.wrapped(model, query_quantizer(books.causal_queries(), model)):
            out = model.generate(ids[:, :5], **cache_kwargs(cache), max_new_tokens=6, min_new_tokens=6, **gen)
        assert out.shape == (2, 11)


@pytest.mark.parametrize("norm,sink", [("head", 0), ("head", 2), ("channel-group", 1)])
@pytest.mark.parametrize("window", [4, 6])
def test_sliding_layer_returns_the_window_of_the_full_layer(norm, sink, window):
    """Fed the same stream, a sliding layer returns the last (window − 1 + new) keys and values
    of a full layer, and holds only about the window."""
    from kvquant.cache import KVQuantLayer, LayerTables

    model = make_model("llama")
    books = calibrated(model, norm=norm, sink=sink, **({"group": 4} if norm == "channel-group" else {}))
    full, sliding = make_cache(model, books, tail="exact", residual=1).layers[0], None
    sliding = KVQuantSlidingLayer(window, LayerTables.from_codebooks(books, 0, full.options), full.options)
    assert isinstance(full, KVQuantLayer)
    g = torch.Generator().manual_seed(window)
    k = torch.randn(1, 2, 20, 16, generator=g)
    v = torch.randn(1, 2, 20, 16, generator=g)
    past = 0
    for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 10), (10, 11), (11, 12), (12, 20)]:
        kf, vf = full.update(k[:, :, lo:hi], v[:, :, lo:hi])
        ks, vs = sliding.update(k[:, :, lo:hi], v[:, :, lo:hi])
        visible = min(past, window - 1) + hi - lo
        assert torch.equal(ks, kf[:, :, -visible:]) and torch.equal(vs, vf[:, :, -visible:])
        assert sliding.get_seq_length() == hi
        assert min(hi, window - 1) <= sliding.held_tokens <= window - 1 + (2 * 4 - 2 + 1 if norm != "head" else 0)
        past = hi


def test_group_mode_memory():
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1)
    cache = make_cache(model, books, tail="exact")
    b, s, d = 2, 15, 16
    with torch.no_grad():
        model(random_ids(b, s), **cache_kwargs(cache), use_cache=True)
    per_head_q = 8 + 8 + 2 + 2 * d * 2 / 4  # key codes, value codes + scale, fp16 mid/half per group of 4
    quantized = s // 4 * 4  # the sink's slot included
    exact = s - quantized + 1  # the incomplete group and the sink's exact copy
    expect = 2 * b * 2 * (quantized * per_head_q + exact * 2 * d * 4)
    assert cache.memory_bytes() == expect == sum(_held_nbytes(layer) for layer in cache.layers)
    assert cache.quantized_bytes_per_token() == 2 * 2 * per_head_q


def test_int8_tail_holds_the_newest_group_per_token_and_quantizes_from_it():
    """tail="int8": keys and values not yet in a complete group are held as INT8 per token and
    head with an fp16 absmax scale (counted: D + 2 bytes each), served as that round trip (the
    sink as its exact copies, also while still in the residual); a completed group is quantized
    from the round trip, so its codes equal those of an exact-tail cache fed the round trip."""
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 2, 11, 16, generator=g) * 3 + 0.5, torch.randn(2, 2, 11, 16, generator=g)

    def int8(x):
        scale = (x.abs().amax(-1, keepdim=True) / 127).half().float()
        y = (x / scale).round().clamp(-127, 127) * scale
        y[:, :, 0] = x[:, :, 0]  # the sink
        return y, scale

    (k8, k_step), (v8, _) = int8(k), int8(v)
    layer, ref = (make_cache(model, books, tail=t).layers[1] for t in ("int8", "exact"))
    sk, sv = layer.update(k[:, :, :2], v[:, :, :2])  # no group complete yet: the sink is in the residual
    assert layer.quantized_tokens == 0 and layer.res_k.dtype == layer.res_v.dtype == torch.int8
    assert torch.equal(sk, k8[:, :, :2]) and torch.equal(sv, v8[:, :, :2])
    for lo, hi in [(2, 9), (9, 11)]:
        sk, sv = layer.update(k[:, :, lo:hi], v[:, :, lo:hi])
    ref.update(k8, v8)
    assert layer.quantized_tokens == 8
    for name in ("k_codes", "k_mid", "k_half", "v_codes", "v_scale", "sink_k", "sink_v"):
        assert torch.equal(getattr(layer, name), getattr(ref, name)), name
    rk, rv = ref._materialize()
    assert torch.equal(sk, rk) and torch.equal(sv, rv)
    assert ((sk[:, :, 8:] - k[:, :, 8:]).abs() <= k_step[:, :, 8:] / 2 * 1.001).all()
    tail_int8, tail_exact = 2 * 2 * 3 * 2 * (16 + 2), 2 * 2 * 3 * 2 * 16 * 4  # 3 tokens' K and V: int8 + scale, float32
    assert layer.memory_bytes() == ref.memory_bytes() - tail_exact + tail_int8


def test_default_int8_tail_decodes_within_int8_rounding_of_the_exact_tail():
    """make_cache's default (tail="int8") through the model, prefill then token by token over 21
    tokens (groups of 4: a newest group of 1 token at the end). While no group is complete the
    logits differ from the exact tail's by INT8 rounding only (< 1% of their range; later, codes
    quantized from INT8 entries flip where an entry lies at a boundary, which a tiny random model
    amplifies); the cache holds fewer bytes."""
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1)
    ids = random_ids(2, 21)
    exact_cache, cache = make_cache(model, books, tail="exact"), make_cache(model, books)
    assert cache.options.tail == "int8"
    exact, got = stepwise_logits(model, ids, exact_cache, 3), stepwise_logits(model, ids, cache, 3)
    err = float((got[:, :3] - exact[:, :3]).abs().max() / exact.abs().max())  # tokens 0-2: no group complete
    assert 0 < err < 0.01, err
    assert torch.isfinite(got).all() and cache.memory_bytes() < exact_cache.memory_bytes()


def test_group_mode_crop_keeps_split_group_exact():
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1)
    cache = make_cache(model, books, tail="exact")
    with torch.no_grad():
        model(random_ids(1, 13), **cache_kwargs(cache), use_cache=True)
    layer = cache.layers[1]
    k_all, v_all = layer._materialize()
    cache.crop(-6)  # 13 -> 7 tokens: group [0, 4) (with the sink) + 3 tokens of the split group [4, 8)
    assert cache.get_seq_length() == 7 and layer.quantized_tokens == 4 and layer.res_k.shape[2] == 3
    k, v = layer._materialize()
    assert torch.equal(k, k_all[:, :, :7]) and torch.equal(v, v_all[:, :, :7])


# --- pre-RoPE keys ----------------------------------------------------------------------------


def prerope_reference(model, books, ids, layer: int, **inputs) -> torch.Tensor:
    """The keys a causal pre-RoPE cache should return after ``ids``: post-RoPE keys of a plain
    DynamicCache derotated at their positions, through the simulated quantizer (complete groups
    quantized, the sink and the incomplete group exact) and rotated back."""
    from transformers import DynamicCache

    from kvquant.core.rope import derotate, rotate
    from kvquant.hf.wrap import attention_modules, rotary_tables

    plain = DynamicCache()  # full layers only: every key, also of sliding-window layers
    with torch.no_grad():
        model(ids, **inputs, **cache_kwargs(plain), use_cache=True)
    k = plain.layers[layer].keys
    pos = attention_modules(model)[layer].kvquant_positions.expand(k.shape[0], -1)
    cos, sin = rotary_tables(model)(layer, pos)
    n = k.shape[2] // 4 * 4
    q = rotate(books.k.apply(derotate(k, cos, sin)[:, :, :n], layer), cos[:, :n], sin[:, :n])
    return torch.cat([k[:, :, :1], q[:, :, 1:], k[:, :, n:]], dim=2)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gptneox"])
def test_prerope_cache_rotates_keys_quantized_before_the_rotation(family):
    """Pre-RoPE codebooks (8-bit scales): the cache stores keys before the rotation and returns,
    after a prefill and after decoding steps, exactly the causal pre-RoPE reference (layer 0: its
    keys do not depend on what earlier layers read from the cache)."""
    model = make_model(family)
    books = calibrated(model, norm="channel-group", group=4, sink=1, scale_bits=8, rope="pre")
    cache = make_cache(model, books, tail="exact", quantize_values=False)  # wraps the model (mode off) for the positions
    ids = random_ids(2, 14)
    layer = cache.layers[0]
    with torch.no_grad():
        model(ids[:, :9], **cache_kwargs(cache), use_cache=True)
        for t in range(9, 14):
            if t in (9, 13):  # (a sliding layer — Gemma3's layer 0 — holds the stream's last tokens)
                held = layer._materialize()[0]
                ref = prerope_reference(model, books, ids[:, :t], 0)
                torch.testing.assert_close(held, ref[:, :, ref.shape[2] - held.shape[2]:], atol=1e-6, rtol=0)
            model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
    # no padding: the positions are the stream indices, nothing is stored for them
    assert layer.k_pos is None and torch.equal(layer._quantized_positions()[0], torch.arange(12 - layer.quantized_tokens, 12, dtype=torch.int32))
    assert cache.memory_bytes() == sum(_held_nbytes(lay) for lay in cache.layers)


def test_prerope_cache_with_left_padding_and_beams():
    """Left padding: positions come from the model's position_ids, so each row's keys are rotated
    back at its own positions (the pad tokens are the row's sinks and share group 0); beam
    search keeps positions with their tokens."""
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=4, sink=1, scale_bits=8, rope="pre")
    ids = random_ids(2, 11)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    inputs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))  # as generate()
    cache = make_cache(model, books, tail="exact", quantize_values=False)
    with torch.no_grad():
        model(ids, **inputs, **cache_kwargs(cache), use_cache=True)
    ref = prerope_reference(model, books, ids, 0, **inputs)
    torch.testing.assert_close(cache.layers[0]._materialize()[0], ref, atol=1e-6, rtol=0)
    # positions depart from the stream index: stored (int32, counted) from then on
    assert torch.equal(cache.layers[0].k_pos[1, 0, 3:], torch.arange(5, dtype=torch.int32))  # real tokens from 0
    assert cache.memory_bytes() == sum(_held_nbytes(lay) for lay in cache.layers)
    # a departure after steps at the stream index (custom position_ids mid-stream) stores the earlier ones too
    cache = make_cache(model, books, tail="exact", quantize_values=False)
    with torch.no_grad():
        model(ids[:, :6], **cache_kwargs(cache), use_cache=True)
        assert cache.layers[0].k_pos is None
        model(ids[:, 6:9], position_ids=torch.tensor([[10, 11, 12]]).expand(2, -1), **cache_kwargs(cache), use_cache=True)
    layer = cache.layers[0]
    assert torch.equal(layer.k_pos[0, 0], torch.tensor([0, 1, 2, 3, 4, 5, 10, 11], dtype=torch.int32))
    assert torch.equal(layer.res_pos[0, 0], torch.tensor([12], dtype=torch.int32))
    beams = model.generate(ids, attention_mask=mask, num_beams=2, **cache_kwargs(make_cache(model, books, tail="exact")), **kw)
    assert beams.shape == (2, 17)
    cache = make_cache(model, books, tail="exact")
    kvquant.unwrap(model)  # removes the hook that passes the positions on
    with pytest.raises(RuntimeError, match="position_ids"), torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)


def test_minmax_values_are_asymmetric_int_per_token_with_8_bit_scales():
    """values="minmax": each token's values over head_dim, (v − mid)/half on 2^b evenly spaced
    levels including ±1 (KIVI's values), mid/half as the 8-bit codes; 2 bytes per token and head."""
    from kvquant.core.groupnorm import code_scales

    model, books = setup("llama")
    cache = make_cache(model, books, tail="exact", bits_v=4, values="minmax")
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, 10, 16, generator=g)
    v = torch.randn(2, 2, 10, 16, generator=g) * 3 + torch.linspace(-2, 2, 16)
    _, got = layer.update(k, v)
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    mid, half = code_scales((hi + lo) / 2, (hi - lo) / 2)
    levels = torch.round(((v - mid) / half + 1) * 7.5).clamp(0, 15)
    torch.testing.assert_close(got, (levels / 7.5 - 1) * half + mid, atol=1e-5, rtol=0)
    assert layer.v_scale.dtype == torch.int8 and layer.v_scale.shape == (2, 2, 10, 2)
    assert cache.layers[0].quantized_bytes_per_token() == make_cache(model, books, tail="exact", bits_v=4).layers[0].quantized_bytes_per_token()
    with pytest.raises(ValueError, match="values must be one of"):
        make_cache(model, books, tail="exact", values="channel")
