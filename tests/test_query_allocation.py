"""Causal query codebooks with their levels allocated over channels
(``Codebooks.causal_queries`` on a file calibrated with Fisher weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_books

import kvquant
from kvquant.codebooks import Codebooks
from kvquant.codebooks.allocation import allocate_static_levels, cached_level_book
from kvquant.core import pair_codebooks as pcb
from kvquant.core.packing import level_bits


@pytest.fixture(scope="module")
def books():
    return tiny_books(norm="channel-group", group=4, sink=1, rope="pre", bits_q=3, bits_k=3, budget=2.5)


def test_levels_follow_the_fisher_weights_at_the_mean_bits(books):
    model, ids, b = books
    q = b.causal_queries(3).q
    levels = q.channel_levels
    assert levels is not None and q.token_scale
    assert q.mean_bits == pytest.approx(3, abs=0.05)  # the budget, to the packing's granularity
    assert q.mean_bits <= 3 + 1e-9
    assert int(levels.min()) >= 2 and int(levels.max()) <= 2**5
    assert len(levels.unique()) > 1  # the channels' weights differ, so do their levels
    fisher = b.hist.channel_fisher_q
    for layer in range(levels.shape[0]):
        for h in range(levels.shape[1]):  # within a head the curves differ by the weight only
            order = fisher[layer, h].argsort()
            assert (levels[layer, h][order].diff() >= 0).all()


def test_each_channel_uses_its_own_level_count(books):
    model, ids, b = books
    q = b.causal_queries(3).q
    torch.manual_seed(1)
    x = torch.randn(1, 4, 200, 8) * q.scale[0][None, :, None] * 3 + q.offset[0][None, :, None]
    out = q.apply(x, 0)
    for h in range(4):
        for c in range(8):
            distinct = out[0, h, 1:, c].unique().numel()  # the token scale moves the values; the codes
            assert distinct >= 2
            codes = torch.bucketize(((x[0, h, 1:, c] - q.offset[0, h, c]) / q.scale[0, h, c]).contiguous(),
                                    q.boundaries[0, h, c].contiguous(), right=True)
            assert int(codes.max()) < int(q.channel_levels[0, h, c])


def test_the_token_scale_maps_the_largest_entry_onto_the_heads_range(books):
    model, ids, b = books
    q = b.causal_queries(3).q
    x = torch.randn(1, 4, 6, 8) * q.scale[0][None, :, None] + q.offset[0][None, :, None]
    big = x.clone()
    big[:, :, 1:] = (x[:, :, 1:] - q.offset[0][None, :, None]) * 40 + q.offset[0][None, :, None]
    small, large = q.apply(x, 0), q.apply(big, 0)
    # the rule is scale-free: 40× the entries give 40× the dequantized entries (up to the fp16 scale)
    torch.testing.assert_close((large[:, :, 1:] - q.offset[0][None, :, None]),
                               40 * (small[:, :, 1:] - q.offset[0][None, :, None]), rtol=2e-3, atol=1e-5)
    rho = b.stats.channel_moments().rho.mean(-1)
    want = cached_level_book(b.config.method, 8, round(float(rho[0, 2]), 2)).centers[-1]
    assert float(q.token_range[0, 2]) == pytest.approx(float(want))
    # against a reference written out channel by channel
    xn = (x - q.offset[0][None, :, None]) / q.scale[0][None, :, None]
    r = (xn.abs().amax(-1, keepdim=True) / q.token_range[0][None, :, None, None]).half().float()
    ref = torch.empty_like(x)
    for h in range(4):
        for c in range(8):
            book = cached_level_book(b.config.method, int(q.channel_levels[0, h, c]), round(float(rho[0, h]), 2))
            u = (xn[0, h, :, c] / r[0, h, :, 0]).double().numpy()
            ref[0, h, :, c] = torch.from_numpy(book.centers[book.encode(u)]).float() * r[0, h, :, 0]
    ref = ref * q.scale[0][None, :, None] + q.offset[0][None, :, None]
    torch.testing.assert_close(small[:, :, 1:], ref[:, :, 1:], rtol=1e-5, atol=1e-5)


def test_allocation_equals_water_filling_on_a_gaussian_model():
    """Two channels, the second with 64× the weight: at 3 bits on average it takes ~3 bits more
    (½ log2 64 = 3 at high rate) and the mean stays within the budget."""
    fisher = np.array([[[1.0, 64.0]]])
    rho = torch.zeros(1, 1)
    levels = allocate_static_levels("lambda", rho, fisher, 6, 3.0)
    bits = [level_bits(int(n)) for n in levels[0, 0]]
    assert sum(bits) / 2 <= 3.0 + 1e-9
    assert bits[1] - bits[0] >= 2
    book = pcb.gaussian_level_codebook("lambda", 8, 0.0)
    np.testing.assert_allclose(book.centers, pcb.gaussian_pair_codebooks("lambda", 3, 3)[0].centers)


def test_without_fisher_weights_every_channel_gets_the_bits_and_a_warning():
    model, ids, b = tiny_books(norm="channel-group", group=4, sink=1, rope="pre", bits_q=3, bits_k=3)
    with pytest.warns(UserWarning, match="no Fisher weights"):
        q = b.causal_queries().q
    assert q.channel_levels is None and q.mean_bits == 3


def test_allocated_queries_survive_save_and_load(books, tmp_path):
    model, ids, b = books
    causal = b.causal_queries(3)
    path = tmp_path / "causal.safetensors"
    causal.save(path)
    loaded = Codebooks.load(path)
    x = torch.randn(1, 4, 6, 8)
    torch.testing.assert_close(loaded.q.apply(x, 1), causal.q.apply(x, 1), rtol=0, atol=0)


def test_the_query_quantizer_counts_the_allocated_bits(books):
    model, ids, b = books
    causal = b.causal_queries(3)
    qq = kvquant.query_quantizer(causal, model)
    assert qq.effective_bits() == pytest.approx(causal.q.mean_bits + 16 / 8)


def test_a_query_gets_the_same_codes_alone_as_in_a_prefill(books):
    """Decoding quantizes one query at a time, a prefill all at once: each token's result is the
    same (nothing is taken from other tokens)."""
    from dataclasses import replace

    model, ids, b = books
    q = replace(b.causal_queries(3).q, sink=0)  # as QueryQuantizer applies it
    torch.manual_seed(2)
    x = torch.randn(2, 4, 9, 8) * q.scale[1][None, :, None] * 2 + q.offset[1][None, :, None]
    x[:, :, 4] *= 30
    together = q.apply(x, 1)
    alone = torch.cat([q.apply(x[:, :, t : t + 1], 1) for t in range(9)], dim=2)
    torch.testing.assert_close(alone, together, rtol=0, atol=0)
