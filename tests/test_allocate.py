"""Bit allocation: greedy reverse water-filling, and codebooks with per-channel bits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_books

from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.core import pair_codebooks as pcb
from kvquant.core import scalar as cb
from kvquant.core.allocate import water_fill


def test_high_rate_curves_get_the_reverse_water_filling_bits():
    # D_u(b) = a_u 4^{-b}: b_u = B + ½ log2(a_u / ā), ā the geometric mean (16 here) → B − 2, B, B + 2
    a = np.array([1.0, 16.0, 256.0])
    curves = a[:, None] * 4.0 ** -np.arange(10)
    bits = water_fill(curves, np.full(3, 1 / 3), 4.0, 1, 9)
    assert bits.tolist() == [2, 4, 6]


def test_greedy_matches_brute_force_on_convex_curves():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, hi = 4, 5
        # convex decreasing: cumulative sums of decreasing positive drops
        drops = np.sort(rng.random((n, hi)) * rng.random((n, 1)) * 10, axis=1)[:, ::-1]
        curves = np.concatenate([np.full((n, 1), drops.sum(1, keepdims=True)), drops.sum(1, keepdims=True)
                                 - np.cumsum(drops, axis=1)], axis=1)
        costs = np.array([0.1, 0.1, 0.3, 0.5])
        budget = float(rng.uniform(1.2, 4.5))
        bits = water_fill(curves, costs, budget, 1, hi)
        assert costs @ bits <= budget + 1e-9 and bits.min() >= 1 and bits.max() <= hi
        best = min(
            (curves[np.arange(n), list(b)].sum() for b in itertools.product(range(1, hi + 1), repeat=n)
             if costs @ np.array(b) <= budget + 1e-9),
        )
        # greedy on convex curves is optimal up to the last unit that did not fit
        assert curves[np.arange(n), bits].sum() <= best + (drops.max() + 1e-12)
        assert curves[np.arange(n), bits].sum() >= best - 1e-12


def test_water_fill_rejects_bad_input():
    curves = np.ones((2, 5))
    with pytest.raises(ValueError, match="below the minimum"):
        water_fill(curves, np.array([0.5, 0.5]), 1.5, 2, 4)
    with pytest.raises(ValueError, match="positive"):
        water_fill(curves, np.array([0.5, 0.0]), 3, 1, 4)
    with pytest.raises(ValueError, match="columns"):
        water_fill(curves, np.array([0.5, 0.5]), 3, 1, 5)
    bad = curves.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        water_fill(bad, np.array([0.5, 0.5]), 3, 1, 4)


def test_budget_config_is_validated():
    with pytest.raises(ValueError, match="budget"):
        CodebookConfig(bits_q=4, bits_k=4, norm="channel-group", budget=4.5)
    with pytest.raises(ValueError, match="budget"):
        CodebookConfig(bits_q=4, bits_k=4, norm="channel-group", budget=0.5)
    with pytest.raises(ValueError, match="channel-group"):
        CodebookConfig(bits_q=4, bits_k=4, norm="head", budget=3)


def test_allocated_codebooks_spend_the_budget_and_beat_equal_bits(tmp_path):
    cfg = dict(method="lambda-lloyd", bits_q=5, bits_k=5, norm="channel-group", group=8, sink=1)
    model, ids, books = tiny_books(**cfg, budget=3.0)
    hist = books.hist
    assert hist.channel_fisher_q.shape == (2, 4, 8) and hist.channel_fisher_k.shape == (2, 2, 8)
    # per-channel Fisher totals add up to the head histograms' totals
    torch.testing.assert_close(hist.channel_fisher_q.sum(-1), hist.fisher_q.sum(-1))
    # one query channel whose errors cost the loss 10⁴× more and one KV head's channels 10⁴× less
    hist.channel_fisher_q[1, 2, 3] *= 1e4
    hist.channel_fisher_k[0, 1] *= 1e-4
    books = books.rebuilt()
    lv_q, lv_k = books.q.channel_levels, books.k.channel_levels
    assert lv_q.shape == (2, 4, 8) and lv_k.shape == (2, 2, 8)
    assert lv_q[1, 2, 3] == 32 and lv_k[0, 1].max() < lv_k.max()
    assert lv_q.min() >= 2 and lv_q.max() <= 32 and lv_k.max() <= 32
    used_levels = set(lv_q.unique().tolist()) | set(lv_k.unique().tolist())
    assert used_levels <= {2, 3, 4, 5, 8, 16, 32} and used_levels & {3, 5}  # packed non-powers of two are used
    mean = 0.5 * (books.q.mean_bits + books.k.mean_bits)
    packed = {2: 1, 3: 1.6, 4: 2, 5: 7 / 3, 8: 3, 16: 4, 32: 5}
    expect = 0.5 * sum(float(sum(packed[int(n)] for n in lv.flatten())) / lv.numel() for lv in (lv_q, lv_k))
    assert mean == pytest.approx(expect)
    assert 3.0 - 0.05 <= mean <= 3.0  # a query-channel bit is 1/128 of the average, a key-channel bit 1/64
    assert books.effective_bits(seqlen=24) == pytest.approx(mean + 32 / 8 + 16 / 24)  # codes + scales + the sink
    assert books.config.code_bits(books.effective_bits(seqlen=24), 8, 24) == pytest.approx(mean)

    # each channel's table uses exactly its allocated number of levels on [−1, 1], no padding level
    grid = torch.linspace(-1, 1, 4001)
    for side in (books.q, books.k):
        for layer in range(2):
            bounds = side.boundaries[layer].flatten(0, 1)
            codes = cb.quantize(grid.expand(bounds.shape[0], -1), bounds, dim=0)
            used = torch.tensor([row.unique().numel() for row in codes])
            assert torch.equal(used, side.channel_levels[layer].flatten().long())

    # a channel with n levels has its head's n-level codebook; with 2^b levels it is quantized
    # exactly as every channel is by the head's b-bit codebooks
    nodes = hist.nodes.numpy()
    for name in ("q", "k"):
        side, count, weight = getattr(books, name), getattr(hist, f"count_{name}"), getattr(hist, f"weight_{name}")
        for layer, h, c in itertools.product(*(range(n) for n in side.channel_levels.shape)):
            n = int(side.channel_levels[layer, h, c])
            want = pcb.histogram_codebook("lambda-lloyd", n, nodes, count[layer, h].numpy(), weight[layer, h].numpy())
            torch.testing.assert_close(side.centers[layer, h, c, :n], torch.from_numpy(want.centers).float())
    x = torch.randn(1, 4, 200, 8) * 3
    for side, xs in (("q", x), ("k", x[:, :2])):
        got = books(xs, 1, side)
        levels = getattr(books, side).channel_levels[1]
        for n in (2, 4, 8, 16, 32):
            if (levels == n).any():
                same = books.rebuilt(budget=0.0, bits_q=n.bit_length() - 1, bits_k=n.bit_length() - 1)(xs, 1, side)
                mask = (levels == n)[None, :, None, :].expand_as(xs)
                assert torch.equal(got[mask], same[mask])

    # allocation lowers the Fisher estimate of the loss increase vs every channel at the same 3 bits
    equal = books.rebuilt(budget=0.0, bits_q=3, bits_k=3)

    def objective(bk: Codebooks) -> float:
        total = 0.0
        for side in ("q", "k"):
            sb, weight = getattr(bk, side), getattr(hist, f"fisher_{side}")
            chan = getattr(hist, f"channel_fisher_{side}")
            for layer, h in itertools.product(range(weight.shape[0]), range(weight.shape[1])):
                for c in range(chan.shape[-1]):
                    if sb.channel_levels is None:
                        cen, bnd = sb.centers[layer, h], sb.boundaries[layer, h]
                    else:
                        n = int(sb.channel_levels[layer, h, c])
                        cen, bnd = sb.centers[layer, h, c, :n], sb.boundaries[layer, h, c, : n - 1]
                    book = cb.Codebook(cen.double().numpy(), bnd.double().numpy())
                    eps = pcb.histogram_distortion(book, nodes, weight[layer, h].numpy()) / float(weight[layer, h].sum())
                    total += float(chan[layer, h, c]) * eps
        return total

    assert objective(books) < 0.9 * objective(equal)

    path = tmp_path / "alloc.safetensors"
    books.save(path)
    again = Codebooks.load(path)
    assert again.config == books.config and torch.equal(again.q.channel_levels, lv_q) and again.k.bits == books.k.bits
    assert torch.equal(again(x[:, :2], 1, "k"), books(x[:, :2], 1, "k"))
    assert again.effective_bits(seqlen=24) == books.effective_bits(seqlen=24)


def test_cache_holds_allocated_keys_exactly_as_the_simulation_quantizes_them():
    """Keys with per-channel level counts and 8-bit group scales: the cache returns the simulated
    path's keys bit for bit, and stores each channel's codes at its own packed width."""
    from kvquant.cache import make_cache
    from kvquant.core.packing import levels_size

    model, _, books = tiny_books(method="lambda", bits_q=4, bits_k=4, norm="channel-group", group=8, sink=1,
                                 scale_bits=8, budget=2.5)
    levels = books.k.channel_levels[1]
    assert len(levels.unique()) > 1  # channels really differ
    cache = make_cache(model, books, quantize_values=False, tail="exact")  # the simulated path's rule
    layer = cache.layers[1]
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 17, 8, generator=g) * 3 + 1  # the sink + 2 whole groups of 8
    kk, _ = layer.update(k, torch.zeros_like(k))
    torch.testing.assert_close(kk, books.k.apply(k, 1), atol=0, rtol=0)
    assert layer.k_codes.shape == (1, 1, 2, sum(levels_size(8, int(n)) for n in levels.flatten()))
    assert layer.k_mid.dtype == layer.k_half.dtype == torch.int8 and layer.k_mid.shape == (1, 2, 2, 8)


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_grad_observer_gets_the_loss_gradients_of_q_and_k(rope):
    """Pre-RoPE, ∂loss/∂q and ∂loss/∂k are the gradients of the q_proj / k_proj outputs (pulled back
    through the rotation); post-RoPE they are not (the rotation mixes the pairs)."""
    from kvquant.hf.calibrate import run_capture

    model, ids, _ = tiny_books(norm="channel-group", group=8)
    outs = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            outs[name] = out
        return hook

    attn = model.model.layers[1].self_attn
    handles = [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k"))]
    grads = {}
    try:
        run_capture(model, ids[:1], lambda *a: None, progress=False, rope=rope,
                    grad_observer=lambda layer, side, x, g: grads.__setitem__((layer, side), g))
    finally:
        for h in handles:
            h.remove()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # weights untouched
    for side, heads in (("q", 4), ("k", 2)):
        proj = outs[side].grad.view(1, 24, heads, 8).transpose(1, 2)
        assert grads[(1, side)].shape == proj.shape and proj.abs().max() > 0
        close = torch.allclose(grads[(1, side)], proj, atol=1e-6 * float(proj.abs().max()), rtol=1e-4)
        assert close == (rope == "pre")


def test_fractional_options_follow_the_lower_convex_hull():
    # options 1, 1.6, 2, 3 bits; unit 0's 1.6-bit option is worse than a mix of 1 and 2 bits
    # (above the chord), unit 1's is much better (below it)
    option_bits = np.array([1.0, 1.6, 2.0, 3.0])
    curves = np.array([[8.0, 7.9, 2.0, 0.5], [8.0, 2.5, 2.0, 0.5]])
    bits = water_fill(curves, np.full(2, 0.5), 1.3, 0, 3, option_bits)
    assert bits.tolist() == [0, 1]  # 1.6 bits bought for unit 1: (8 − 2.5) / 0.6 beats every other slope
    bits = water_fill(curves, np.full(2, 0.5), 2.0, 0, 3, option_bits)
    # unit 0 jumps 1 → 2 bits, never stopping at its dominated 1.6; unit 1's 2 bits lie above its
    # chord 1.6 → 3, so it would go there next, which no longer fits
    assert bits.tolist() == [2, 1]
    assert 0.5 * option_bits[bits].sum() == pytest.approx(1.8)
    with pytest.raises(ValueError, match="increasing"):
        water_fill(curves, np.full(2, 0.5), 2.0, 0, 3, option_bits[::-1])


def test_config_at_exact_effective_bits():
    base = CodebookConfig("lambda", 4, 4, "channel-group", group=128, sink=1, scale_bits=8)
    cfg = base.at_effective_bits(3.0, head_dim=64, seqlen=2048)
    # code + 16/128 (8-bit scales) + 16/2048 (the exact sink; 2048 tokens are 16 whole groups) = 3
    assert cfg.budget == pytest.approx(3 - 16 / 2048 - 0.125, abs=1e-6)
    # 2047 tokens: the newest 127 (the incomplete group) are held exact, 16 bits each
    tail = 127 / 2047
    assert cfg.effective_bits(cfg.budget, 64, 2047) == pytest.approx((cfg.budget + 0.125) * (1 - tail) + 16 * tail + 16 / 2047)
    assert (cfg.bits_q, cfg.bits_k) == (5, 5)  # ⌈2.87⌉ + 2
    assert cfg.effective_bits(cfg.budget, 64, 2048) == pytest.approx(3.0, abs=1e-5)
    assert base.at_effective_bits(3.0, 64, 2048, caps=(3, 4)).bits_q == 3
    with pytest.raises(ValueError, match="1.1 effective bits leave"):
        base.at_effective_bits(1.1, 64, 2048)
