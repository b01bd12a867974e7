"""Dynamic per-channel-group normalisation, its calibration histograms and codebooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_books

from kvquant.codebooks import CodebookConfig, Codebooks, SideBooks
from kvquant.core import pair_codebooks as pcb
from kvquant.core import scalar as cb
from kvquant.core.groupnorm import (
    GroupHistogram,
    group_minmax,
    group_range,
    group_restore,
    hist_index,
)
from kvquant.evaluation.baselines import int_per_channel


def test_group_minmax_round_trip_and_range():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 8) * 5
    x[:, :, 5, 2] = 40.0
    xt, mid, half = group_minmax(x, 16)
    assert xt.shape == x.shape and mid.shape == (2, 3, 3, 1, 8)
    assert mid.dtype == torch.float32 and torch.equal(mid, mid.half().float())  # the scales as stored: fp16
    assert xt.abs().max() <= 1 + 2e-3  # the range rounded to fp16
    assert torch.allclose(group_restore(xt, mid, half, 16), x, rtol=1e-6, atol=1e-5)
    # every full group reaches ±1 in every channel
    assert torch.allclose(xt[:, :, :16].amax(2), torch.ones(2, 3, 8), atol=2e-3)


def test_constant_channel_is_exact():
    x = torch.ones(1, 1, 8, 4) * 3.0
    xt, mid, half = group_minmax(x, 4)
    assert torch.equal(xt, torch.zeros_like(x))
    assert torch.equal(group_restore(xt, mid, half, 4), x)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_codebook_is_int_per_channel(bits):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 40, 8)
    k = 2**bits
    book = cb.Codebook.nearest(np.linspace(-1, 1, k))
    c = torch.tensor(book.centers, dtype=torch.float32).expand(2, k)
    b = torch.tensor(book.boundaries, dtype=torch.float32).expand(2, k - 1)
    side = SideBooks(bits, c[None], b[None], torch.zeros(1, 2, 8), torch.ones(1, 2, 8), group=8)
    # the same up to the fp16 rounding of the stored (mid, half): an entry within it of a decision
    # boundary may land on the neighbouring level
    diff = (side.apply(x, 0)[:, :, :40] - int_per_channel(x, bits, group=8)).abs()
    assert (diff > 5e-3).float().mean() < 0.01 and diff.median() < 1e-3


def test_sink_tokens_are_exact_and_excluded_from_groups():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 20, 8)
    x[:, :, 0] = 100.0  # an attention sink
    c = torch.linspace(-1, 1, 4).expand(1, 2, 4)
    b = (0.5 * (c[..., 1:] + c[..., :-1])).contiguous()
    with_sink = SideBooks(2, c, b, torch.zeros(1, 2, 8), torch.ones(1, 2, 8), group=4, sink=1)
    out = with_sink.apply(x, 0)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    without = SideBooks(2, c, b, torch.zeros(1, 2, 8), torch.ones(1, 2, 8), group=4)
    err_sink = (out[:, :, 1:] - x[:, :, 1:]).norm()
    err_plain = (without.apply(x, 0)[:, :, 1:] - x[:, :, 1:]).norm()
    assert err_sink < 0.5 * err_plain  # the sink no longer stretches its group's range


def test_histogram_update_matches_brute_force():
    torch.manual_seed(3)
    b, h, h_kv, t, d, g = 1, 4, 2, 9, 4, 3
    q, k = torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    hist = GroupHistogram.zeros(1, h, h_kv, group=g, sink=1, bins=64)
    hist.update(0, q, k, mask)
    assert hist.count_q[0].sum() == h * (t - 1) * d
    assert hist.count_k[0].sum() == h_kv * (t - 1) * d
    # brute force for the query side: weight = half² · mean_{s ≤ t} k[s, j]²
    expect = torch.zeros(h, 65, dtype=torch.float64)
    # groups [0, 3), [3, 6), [6, 9) aligned at token 0; the sink (token 0) outside group 0's range
    xt, _, half = group_minmax(torch.cat([q[:, :, 1:2], q[:, :, 1:]], dim=2), g)
    idx = hist_index(xt, 64)
    for hh in range(h):
        for tt in range(1, t):
            for j in range(d):
                partner = (k[0, hh // 2, : tt + 1, j] ** 2).mean()
                hw = half[0, hh, tt // g, 0, j]
                expect[hh, idx[0, hh, tt, j]] += float(hw**2 * partner)
    torch.testing.assert_close(hist.weight_q[0], expect, rtol=1e-5, atol=1e-9)


def test_fisher_histogram_matches_brute_force():
    torch.manual_seed(4)
    h, t, d, g = 2, 9, 4, 3
    x, grad = torch.randn(1, h, t, d), torch.randn(1, h, t, d)
    with pytest.raises(ValueError, match="head_dim"):
        GroupHistogram.zeros(2, h, 1, group=g, sink=1, bins=64, fisher=True)
    hist = GroupHistogram.zeros(2, h, 1, group=g, sink=1, bins=64, fisher=True, head_dim=d)
    hist.update_grad(1, "q", x, grad)
    expect = torch.zeros(h, 65, dtype=torch.float64)
    per_channel = torch.zeros(h, d, dtype=torch.float64)
    xt, _, half = group_minmax(torch.cat([x[:, :, 1:2], x[:, :, 1:]], dim=2), g)
    idx = hist_index(xt, 64)
    for hh in range(h):
        for tt in range(1, t):
            for j in range(d):
                w = float(half[0, hh, tt // g, 0, j] ** 2 * grad[0, hh, tt, j] ** 2)
                expect[hh, idx[0, hh, tt, j]] += w
                per_channel[hh, j] += w
    torch.testing.assert_close(hist.fisher_q[1], expect, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(hist.channel_fisher_q[1], per_channel, rtol=1e-5, atol=1e-9)
    assert hist.channel_fisher_q[0].sum() == 0 and hist.channel_fisher_k.shape == (2, 1, d)
    assert hist.fisher_q[0].sum() == 0 and hist.fisher_k.sum() == 0 and hist.count_q.sum() == 0
    again = GroupHistogram.from_dict(hist.to_dict())
    assert torch.equal(again.fisher_q, hist.fisher_q) and torch.equal(again.channel_fisher_q, hist.channel_fisher_q)
    plain = GroupHistogram.zeros(1, h, 1, group=g, sink=1)
    assert plain.fisher_q is None and GroupHistogram.from_dict(plain.to_dict()).fisher_q is None
    with pytest.raises(ValueError, match="Fisher"):
        plain.update_grad(0, "q", x, grad)


def test_histogram_codebooks_order_by_their_objectives():
    rng = np.random.default_rng(4)
    nodes = np.linspace(-1, 1, 513)
    count = np.exp(-((nodes / 0.3) ** 2)) + 0.01 + rng.random(513) * 0.01
    count[[0, -1]] += 3.0  # the group's min and max are atoms at ±1
    weight = count * (0.5 + nodes**2)
    err = lambda book, w: float(np.sum(w * (nodes - book(nodes)) ** 2))  # noqa: E731
    books = {m: pcb.histogram_codebook(m, 8, nodes, count, weight) for m in cb.METHODS}
    assert err(books["lambda-lloyd"], weight) <= err(books["lambda"], weight)
    assert err(books["lambda-lloyd"], weight) < err(books["uniform"], weight)
    assert err(books["lloydmax"], count) < err(books["uniform"], count)
    np.testing.assert_allclose(books["uniform"].centers, np.linspace(-1, 1, 8))
    with pytest.raises(ValueError, match="empty"):
        pcb.histogram_codebook("lambda", 8, nodes, count * 0, weight * 0)
    # any level count (bit allocation gives channels 3 or 5 levels)
    three = {m: pcb.histogram_codebook(m, 3, nodes, count, weight) for m in cb.METHODS}
    np.testing.assert_allclose(three["uniform"].centers, [-1, 0, 1])
    assert all(b.levels == 3 for b in three.values())
    assert err(three["lambda-lloyd"], weight) < err(three["uniform"], weight)
    for bad in (1, 257, 2.5):
        with pytest.raises(ValueError, match="levels"):
            pcb.histogram_codebook("lambda", bad, nodes, count, weight)


def test_channel_group_codebooks_file_round_trip_and_bits(tmp_path):
    model, ids, books = tiny_books(method="lambda-lloyd", bits_q=3, bits_k=3, norm="channel-group", group=8, sink=1)
    assert books.effective_bits(seqlen=24) == pytest.approx(3 + 32 / 8 + 16 / 24)
    # 20 tokens: 16 in whole groups, the newest 4 held exact
    assert books.effective_bits(seqlen=20) == pytest.approx((3 + 32 / 8) * 16 / 20 + 16 * 4 / 20 + 16 / 20)
    with pytest.raises(ValueError, match="sequence length"):
        books.effective_bits()
    path = tmp_path / "cg.safetensors"
    books.save(path)
    again = Codebooks.load(path)
    assert again.config == books.config and again.q.group == 8 and again.k.sink == 1
    x = torch.randn(1, 4, 24, 8)
    assert torch.equal(again(x, 1, "q"), books(x, 1, "q"))
    assert again.rebuilt(method="uniform").config.method == "uniform"
    with pytest.raises(ValueError, match="histograms"):
        books.rebuilt(group=16)


def test_eight_bit_scales_cover_the_range_and_count_16_over_g(tmp_path):
    from kvquant.core.groupnorm import code_scales

    torch.manual_seed(5)
    x = torch.randn(2, 3, 64, 8) * torch.logspace(-3, 2, 8)  # channels from 1e-3 to 1e2
    x[:, :, :, 2] += 500.0  # an offset far beyond the channel's spread: |mid| ≫ 127/16 · half
    x[0, 0, :, 5] = 0.0  # an all-zero channel
    xt, mid, half = group_minmax(x, 16, scale_bits=8)
    _, mid16, half16 = group_range(x, 16)  # unrounded
    assert (half >= half16 * (1 - 1e-6)).all() and (half <= torch.maximum(half16, mid16.abs() * 16 / 127) * 2**0.125 + 1e-9).all()
    e = 8 * torch.log2(half[half > 0])
    assert torch.allclose(e, e.round(), atol=1e-3) and e.min() >= -128 and e.max() <= 127  # 8-bit exponents
    m = mid[half > 0] / (half[half > 0] / 16)
    assert torch.allclose(m, m.round(), atol=1e-3) and m.abs().max() <= 127  # 8-bit offsets
    assert xt.abs().max() <= 1 + 1 / 32 + 1e-5
    torch.testing.assert_close(group_restore(xt, mid, half, 16), x, rtol=1e-5, atol=1e-4)
    assert torch.equal(code_scales(torch.zeros(3), torch.zeros(3))[1], torch.zeros(3))
    # the wide offset channel: half-range widened to |mid|·16/127, never a wrong offset
    assert (half[..., 2] >= mid16[..., 2].abs() * 16 / 127 * (1 - 1e-6)).all()
    # codebooks with 8-bit scales: histograms keyed by them, 16/G bits, file round trip, the cache
    model, ids, books = tiny_books(method="lambda", bits_q=3, bits_k=3, norm="channel-group", group=8, sink=1,
                                   scale_bits=8)
    assert books.hist.key == (8, 1, 0.0, 8) and books.q.scale_bits == 8
    assert books.effective_bits(seqlen=24) == pytest.approx(3 + 16 / 8 + 16 / 24)
    path = tmp_path / "s8.safetensors"
    books.save(path)
    again = Codebooks.load(path)
    y = torch.randn(1, 4, 24, 8)
    assert again.config.scale_bits == 8 and torch.equal(again(y, 0, "q"), books(y, 0, "q"))
    with pytest.raises(ValueError, match="scale_bits 16"):
        books.rebuilt(scale_bits=16)
    with pytest.raises(ValueError, match="scale_bits"):
        CodebookConfig(norm="head", scale_bits=8)
    with pytest.raises(ValueError, match="scale_bits"):
        CodebookConfig(norm="channel-group", scale_bits=4)
    from kvquant.cache import make_cache

    assert make_cache(model, books).options.scale_bits == 8  # the cache stores them as the int8 codes
