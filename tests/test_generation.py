"""kvquant.evaluation.generation: chunked generation-mode NLL equals token-by-token decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, random_ids
from transformers import DynamicCache

from kvquant.cache import make_cache
from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig
from kvquant.hf.compat import cache_kwargs
from kvquant.evaluation.generation import chunk_starts, generation_nll


@torch.no_grad()
def stepwise_nll(model, ids, new_cache) -> float:
    total = 0.0
    for row in ids:
        cache = new_cache()
        for t in range(row.numel() - 1):
            logits = model(row[None, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1]
            total += float(F.cross_entropy(logits[None], row[t + 1 : t + 2]))
    return total


@pytest.mark.parametrize("family,config", [
    ("llama", dict(norm="channel-group", group=4, sink=1, scale_bits=8, rope="pre", budget=3.0)),
    # groups of 8: token by token, decoding steps read the codes (kvquant.kernels.dispatch); chunks dequantize
    ("llama", dict(norm="channel-group", group=8, sink=1, scale_bits=8, rope="pre", budget=3.0)),
    ("gemma3", dict(norm="channel-group", group=4, sink=2, rope="pre")),
    ("llama", dict(norm="channel", sink=0)),
])
def test_chunked_generation_equals_token_by_token(family, config):
    model = make_model(family)
    cfg = CodebookConfig("lambda", 4, 4, **config)
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(cfg), progress=False)
    ids = random_ids(2, 19)
    for new in (lambda: make_cache(model, books), lambda: DynamicCache(config=model.config)):
        total, count, cache = generation_nll(model, ids, new, progress=False)
        assert count == 2 * 18 and cache.get_seq_length() == 19
        assert total == pytest.approx(stepwise_nll(model, ids, new), rel=1e-5)


def test_chunk_starts():
    model = make_model("llama")
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(CodebookConfig(
        "lambda", 4, 4, norm="channel-group", group=4, sink=1)), progress=False)
    assert chunk_starts(make_cache(model, books), 14) == [0, 3, 7, 11]  # token 4k − 1 completes group k (aligned at 0)
    assert chunk_starts(make_cache(model, books, residual=2), 14) == [0, 5, 9, 13]
    assert chunk_starts(DynamicCache(), 14) == [0]


def test_keys_only_allocation_and_kivi_cache():
    """Rows for a KV cache: ``budget_sides="k"`` spreads the code budget over the key channels
    only (queries unallocated) and makes the keys' effective bits exact; ``kivi_codebooks`` is
    min–max INT per channel over groups, post-RoPE, fp16 scales — the cache's complete key
    groups equal the simulated ``int{b}-channel`` baseline up to the fp16 rounding of the scales."""
    from dataclasses import replace

    from kvquant.evaluation.baselines import int_per_channel, kivi_codebooks

    model = make_model("llama")
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(CodebookConfig(
        "lambda-lloyd", 4, 4, norm="channel-group", group=4, sink=1, scale_bits=8, budget=3.0)), progress=False)
    k_only = books.at_effective_bits(7.5, 16, budget_sides="k")  # 2.5 code bits + 16/4 (scales) + 16/16 (the sink)
    assert k_only.config.budget_sides == "k" and k_only.q.channel_levels is None
    assert k_only.config.budget == pytest.approx(2.5) and 7.5 - 0.05 <= k_only.effective_bits(seqlen=16) <= 7.5
    assert k_only.k.mean_bits == pytest.approx(k_only.config.budget, abs=0.05)
    with pytest.raises(ValueError, match="budget_sides"):
        replace(books.config, budget_sides="q")
    # the values' bits the file records are make_cache's default
    with_v = replace(k_only, config=replace(k_only.config, bits_v=2))
    assert make_cache(model, with_v).options.bits_v == 2 and make_cache(model, with_v, bits_v=3).options.bits_v == 3
    with pytest.raises(ValueError, match="bits_v"):
        replace(books.config, bits_v=9)

    kivi = kivi_codebooks(books, 3)
    assert kivi.config.rope == "post" and kivi.k.sink == 0 and kivi.k.scale_bits == 16 and kivi.k.group == 4
    cache = make_cache(model, kivi, quantize_values=False, tail="exact")  # KIVI's residual is exact
    from kvquant.evaluation.generation import cache_factories

    made = {n: f() for n, f in cache_factories(model, {"kivi@3": kivi, "kvquant": books}).items()}
    assert made["kivi@3"].options.tail == "exact" and made["kvquant"].options.tail == "int8"
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 10, 16, generator=g) * 3, torch.randn(1, 2, 10, 16, generator=g)
    kk, _ = cache.layers[0].update(k, v)
    ref = int_per_channel(k[:, :, :8], 3, group=4)
    torch.testing.assert_close(kk[:, :, :8], ref, atol=1e-2, rtol=1e-2)
    assert torch.equal(kk[:, :, 8:], k[:, :, 8:])
    with pytest.raises(ValueError, match="integer"):
        kivi_codebooks(books, 2.5)


def _small_quanto(model, residual: int):
    """transformers' 4-bit quanto cache at the tiny model's size: ``residual`` exact recent tokens,
    groups of 16 (the tiny model has 2 × 16 values per token)."""
    from kvquant.evaluation.generation import LibraryCache

    cache = LibraryCache("quanto", 4).new(model)
    for layer in cache.layers:
        layer.residual_length, layer.q_group_size = residual, 16
    return cache


def test_quanto_row_chunked_equals_stepwise_and_counts_its_codes():
    """transformers' QuantizedCache (quanto) as a generation-mode row: the chunks of
    chunk_starts give what token-by-token decoding gives, and kv_bits counts its packed codes,
    scales and exact residual (far below the fp32 cache, above 4/32 of it)."""
    pytest.importorskip("optimum.quanto")
    from kvquant.evaluation.generation import LibraryCache, kv_bits

    model = make_model("llama")
    ids = random_ids(1, 40, seed=3)
    def small():
        return _small_quanto(model, 8)

    assert chunk_starts(small(), 40) == [0, 1, 8, 9, 16, 17, 24, 25, 32, 33]
    chunked, n, cache = generation_nll(model, ids, small, progress=False)
    stepwise = 0.0
    step_cache = small()
    with torch.no_grad():
        for t in range(39):
            logits = model(ids[:, t : t + 1], **cache_kwargs(step_cache), use_cache=True).logits[0, -1]
            stepwise += float(F.cross_entropy(logits[None].float(), ids[0, t + 1 : t + 2]))
    assert chunked == pytest.approx(stepwise, rel=1e-4)
    bits, per_token = kv_bits(cache)
    assert 4 < bits < 16 and per_token > 0
    with pytest.raises(ValueError, match="backend"):
        LibraryCache("int", 4)


def _fp_and_quantized_rows(bits: int):
    """A tiny Llama, codebooks at ``bits`` (groups of 4, a sink, pre-RoPE), two windows of 19 tokens,
    and factories of a DynamicCache and of kvquant's cache (values at ``bits``)."""
    model = make_model("llama")
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(CodebookConfig(
        "lambda", bits, bits, norm="channel-group", group=4, sink=1, rope="pre")), progress=False)
    dyn = lambda: DynamicCache(config=model.config)  # noqa: E731
    quant = lambda: make_cache(model, books, bits_v=bits)  # noqa: E731
    return model, books, random_ids(2, 19, seed=5), dyn, quant


def test_generation_mode_divergence_from_the_fp_cache():
    """Generation mode: the KLD of a row is measured against the fp row (DynamicCache) on the
    same chunks — a second DynamicCache row gives exactly 0 and full agreement; kvquant's cache
    gives the KLD of its chunked logits computed directly."""
    from kvquant.evaluation.divergence import Agreement
    from kvquant.evaluation.generation import cache_logits, evaluate_generation

    model, books, ids, dyn, quant = _fp_and_quantized_rows(2)
    rows = evaluate_generation(model, ids, {"q": quant, "fp": dyn, "fp again": dyn}, progress=False)
    assert list(rows) == ["q", "fp", "fp again"]
    assert (rows["fp again"].kld, rows["fp again"].top1) == (0.0, 1.0)
    want = Agreement()
    with torch.no_grad():
        for row in ids:
            ref = torch.cat([lg for _, lg in cache_logits(model, row[None], dyn())])[:-1].log_softmax(-1)
            want.add(ref, torch.cat([lg for _, lg in cache_logits(model, row[None], quant())])[:-1])
    mean, p99, top1 = want.summary()
    assert rows["q"].kld == pytest.approx(mean, rel=1e-6) and mean > 0
    assert rows["q"].kld_p99 == pytest.approx(p99, rel=1e-6) and rows["q"].top1 == top1


@pytest.mark.parametrize("family,row", [("llama", "kvquant"), ("gemma3", "kvquant"), ("llama", "quanto"),
                                        ("llama", "dynamic")])
def test_held_bits_after_every_token_equal_a_cache_fed_that_many(family, row):
    """The mean / end / max bits of a window come from a shape-only replay: after t tokens it must
    give what a cache holds after decoding t real tokens one by one (group 4 with a sink: the exact tail grows and
    shrinks; gemma3's sliding layer drops expired groups; quanto re-quantizes every 4 tokens)."""
    from kvquant.evaluation.generation import held_bits, kv_bits

    model = make_model(family)
    if row == "quanto":
        pytest.importorskip("optimum.quanto")
        def new():
            return _small_quanto(model, 4)
    elif row == "kvquant":
        books = calibrate(model, random_ids(2, 16, seed=7),
                          CalibrationConfig(CodebookConfig("lambda", 4, 4, norm="channel-group", group=4, sink=1,
                                                           rope="pre")), progress=False)

        def new():
            return make_cache(model, books)
    else:
        def new():
            return DynamicCache(config=model.config)

    ids = random_ids(1, 14, seed=2)
    curve, cache = [], new()
    for t in range(1, 15):  # decoding token by token: the bits after each token
        with torch.no_grad():
            model(ids[:, t - 1:t], **cache_kwargs(cache), use_cache=True)
        curve.append(kv_bits(cache)[0])
        assert held_bits(new, model, t).end == pytest.approx(curve[-1], rel=1e-12), t
    held = held_bits(new, model, 14)
    assert held.mean == pytest.approx(sum(curve) / 14, rel=1e-12) and held.max == pytest.approx(max(curve), rel=1e-12)
    if row != "dynamic":
        assert held.max > held.end  # the exact tail costs more while a group fills


def test_library_rows_refused_for_sliding_window_models_before_any_row_runs():
    """transformers' QuantizedCache refuses sliding layers only at its first window (after the other
    rows ran): the rows are refused when the caches are set up."""
    from kvquant.evaluation.generation import LibraryCache, cache_factories

    with pytest.raises(ValueError, match="quanto@4: transformers' QuantizedCache holds full-attention layers only"):
        cache_factories(make_model("gemma3"), {"fp": None, "quanto@4": LibraryCache("quanto", 4)})
    assert set(cache_factories(make_model("llama"), {"fp": None, "quanto@4": LibraryCache("quanto", 4)})) == {"fp", "quanto@4"}


def test_generation_rows_with_quantized_queries():
    """``queries={row: quantizer}``: that row runs with the model wrapped by the query quantizer (its
    perplexity is what the same row gives inside ``kvquant.wrapped``), the other rows — the fp
    reference of the KLD among them — do not, and the model is left as it was."""
    import kvquant
    from kvquant.evaluation.generation import evaluate_generation
    from kvquant.hf.wrap import controller, is_wrapped

    model, books, ids, dyn, quant = _fp_and_quantized_rows(3)
    qq = kvquant.query_quantizer(books.causal_queries(2), model)
    kvquant.unwrap(model)
    rows = evaluate_generation(model, ids, {"fp": dyn, "kv": quant, "kv+q": quant}, progress=False,
                               queries={"kv+q": qq})
    assert not is_wrapped(model) or controller(model).quantizer is None
    plain = evaluate_generation(model, ids, {"fp": dyn, "kv": quant}, progress=False)
    assert rows["fp"].ppl == plain["fp"].ppl and rows["kv"].ppl == plain["kv"].ppl
    with kvquant.wrapped(model, qq):
        inside = evaluate_generation(model, ids, {"kv+q": quant}, progress=False)
    assert rows["kv+q"].ppl == pytest.approx(inside["kv+q"].ppl, rel=1e-6)
    assert abs(rows["kv+q"].ppl - rows["kv"].ppl) > 1e-4 and rows["kv+q"].kld > rows["kv"].kld > 0
