"""Causal query codebooks with their levels allocated over channels
(``Codebooks.causal_queries`` on a file calibrated with Fisher weights)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import damaged_copy, tiny_books

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
    q = b.causal_queries(3, norm="channel-token").q
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
    q = b.causal_queries(3, norm="channel-token").q
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
    q = b.causal_queries(3, norm="channel-token").q
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
    causal = b.causal_queries(3, norm="channel-token")
    path = tmp_path / "causal.safetensors"
    causal.save(path)
    loaded = Codebooks.load(path)
    x = torch.randn(1, 4, 6, 8)
    torch.testing.assert_close(loaded.q.apply(x, 1), causal.q.apply(x, 1), rtol=0, atol=0)


def test_the_query_quantizer_counts_the_allocated_bits(books):
    model, ids, b = books
    causal = b.causal_queries(3, norm="channel-token")
    qq = kvquant.query_quantizer(causal, model)
    assert qq.effective_bits() == pytest.approx(causal.q.mean_bits + 16 / 8)


def test_a_query_gets_the_same_codes_alone_as_in_a_prefill(books):
    """Decoding quantizes one query at a time, a prefill all at once: each token's result is the
    same (nothing is taken from other tokens)."""
    model, ids, b = books
    q = replace(b.causal_queries(3, norm="channel-token").q, sink=0)  # as QueryQuantizer applies it
    torch.manual_seed(2)
    x = torch.randn(2, 4, 9, 8) * q.scale[1][None, :, None] * 2 + q.offset[1][None, :, None]
    x[:, :, 4] *= 30
    together = q.apply(x, 1)
    alone = torch.cat([q.apply(x[:, :, t : t + 1], 1) for t in range(9)], dim=2)
    torch.testing.assert_close(alone, together, rtol=0, atol=0)


# --- transform coding (norm="klt") -----------------------------------------------------------


def test_the_gram_holds_the_histograms_tokens(books):
    """``gram_q`` is Σ [q, 1][q, 1]ᵀ over the tokens the histograms bin: complete groups, past the sink."""
    from kvquant.core.groupnorm import GroupHistogram

    hist = GroupHistogram.zeros(1, 2, 1, group=4, sink=1, fisher=True, head_dim=3)
    torch.manual_seed(3)
    q, k = torch.randn(2, 2, 11, 3), torch.randn(2, 1, 11, 3)
    hist.update(0, q, k, torch.ones(1, 1, 11, 11, dtype=torch.bool).tril())
    kept = q[:, :, 1:8].double()  # tokens 1..7: the sink out, the incomplete group 8..10 out
    g = hist.gram_q[0]
    torch.testing.assert_close(g[:, :3, :3], torch.einsum("bhtd,bhte->hde", kept, kept))
    torch.testing.assert_close(g[:, :3, 3], kept.sum((0, 2)))
    assert g[:, 3, 3].tolist() == [14.0, 14.0]


def test_klt_queries_with_an_identity_basis_are_the_channel_rule():
    """With V = I and unit component deviations the transform is the identity: the same tables
    give bit-identical queries (the transform adds nothing else)."""
    model, ids, b = tiny_books(norm="channel-group", group=4, sink=1, rope="pre", bits_q=3, bits_k=3, budget=2.5)
    q = b.causal_queries(3, norm="channel-token").q
    L, H, D = q.offset.shape
    eye = replace(q, basis=torch.eye(D).expand(L, H, D, D).contiguous(), basis_sd=torch.ones(L, H, D))
    x = torch.randn(2, H, 7, D) * 3
    torch.testing.assert_close(eye.apply(x, 1), q.apply(x, 1), rtol=0, atol=0)


def test_klt_components_are_uncorrelated_with_unit_variance(books):
    """On the calibration's own queries the components y = (x̃ V)/s have E[y yᵀ] = I (the basis
    diagonalises the Fisher-weighted second moment the Gram holds)."""
    from kvquant.hf.calibrate import run_capture

    model, ids, b = books
    q = b.causal_queries(3, norm="klt").q
    seen = {}

    def observe(layer, qx, kx, mask):  # one call per layer and window (batch size 1)
        seen[layer] = torch.cat([seen[layer], qx.detach()]) if layer in seen else qx.detach()

    run_capture(model, ids, observe, progress=False, rope="pre")
    for layer, qx in seen.items():
        xs = qx[:, :, 1:].double()  # the tokens the Gram holds (sink 1; 24 tokens: complete groups of 4)
        xn = (xs - q.offset[layer].double()[None, :, None]) / q.scale[layer].double()[None, :, None]
        y = torch.einsum("bhtd,hde->bhte", xn, q.basis[layer].double()) / q.basis_sd[layer].double()[None, :, None]
        m = torch.einsum("bhtd,bhte->hde", y, y) / (y.shape[0] * y.shape[2])
        big = q.basis_sd[layer] > 1e-3 * q.basis_sd[layer].amax(-1, keepdim=True)  # rank: 46 tokens, 8 dims
        for h in range(m.shape[0]):
            sub = m[h][big[h]][:, big[h]]
            torch.testing.assert_close(sub, torch.eye(sub.shape[0], dtype=torch.float64), rtol=0, atol=1e-4)


def test_klt_levels_follow_the_component_variances_at_the_mean_bits(books):
    model, ids, b = books
    q = b.causal_queries(3, norm="klt").q
    assert q.token_scale and q.mean_bits <= 3 + 1e-9 and q.mean_bits == pytest.approx(3, abs=0.05)
    assert int(q.channel_levels.min()) >= 1 and int(q.channel_levels.max()) <= 2 ** (3 + 3)
    for layer in range(q.channel_levels.shape[0]):
        for h in range(q.channel_levels.shape[1]):  # the basis is in ascending λ: levels never fall
            assert (q.channel_levels[layer, h].diff() >= 0).all()


def test_klt_token_range_is_the_book_edge_or_the_expected_largest_component(books):
    """The token's largest |y| goes onto max(outermost center of the 2^B book, E[max of n |N(0,1)|]),
    n the head's coded components (at least 2 levels)."""
    from kvquant.codebooks.allocation import expected_max_abs_gaussian

    model, ids, b = books
    rho = b.stats.channel_moments().rho.mean(-1)
    g = torch.Generator().manual_seed(0)
    for n in (8, 5):
        sampled = float(torch.randn(400000, n, generator=g).abs().amax(-1).mean())
        assert expected_max_abs_gaussian(n) == pytest.approx(sampled, abs=0.01)
    for bits in (1, 3):
        q = b.causal_queries(bits, norm="klt").q
        for layer, h in ((0, 0), (1, 3)):
            edge = float(cached_level_book(b.config.method, 2**bits, round(float(rho[layer, h]), 2)).centers[-1])
            emax = expected_max_abs_gaussian(int((q.channel_levels[layer, h] > 1).sum()))
            assert float(q.token_range[layer, h]) == pytest.approx(max(edge, emax), rel=1e-6)


def test_klt_drops_the_weakest_components_and_they_take_no_part_in_the_range(books, tmp_path):
    """At 1 bit per entry some components get 1 level (0 bits): the lowest-λ ones; such a
    component decodes to its mean whatever its value, and moving it leaves the token's other codes
    (and so its scale) as they were. The file keeps them; 1-level keys are refused."""
    model, ids, b = books
    causal = b.causal_queries(1, norm="klt")
    q = replace(causal.q, sink=0)
    dropped = q.channel_levels == 1
    assert dropped.any() and q.mean_bits <= 1 + 1e-9 and level_bits(1) == 0.0
    layer, h = [int(i) for i in dropped.nonzero()[0][:2]]
    assert dropped[layer, h, 0]  # ascending λ: the weakest component goes first
    D = q.offset.shape[-1]
    torch.manual_seed(5)
    x = torch.randn(1, q.offset.shape[1], 6, D) * 2
    j = int(dropped[layer, h].nonzero()[-1])  # the strongest dropped component of the head
    step = (q.basis[layer, h][:, j] * q.basis_sd[layer, h, j]) * q.scale[layer, h]  # +1 in y_j, in x units
    moved = x.clone()
    moved[0, h] += 50.0 * step  # y_j far beyond every coded component's range
    torch.testing.assert_close(q.apply(moved, layer), q.apply(x, layer), rtol=1e-5, atol=1e-5)
    coded = replace(q, channel_levels=q.channel_levels.clamp(min=2))  # the same tables, the range over all D
    assert not torch.allclose(coded.apply(moved, layer), coded.apply(x, layer), rtol=1e-3, atol=1e-3)
    path = tmp_path / "dropped.safetensors"
    causal.save(path)
    torch.testing.assert_close(Codebooks.load(path).q.channel_levels, causal.q.channel_levels, rtol=0, atol=0)
    b.save(tmp_path / "keys.safetensors")  # allocated keys (budget 2.5): packed, 2 levels at least
    bad = damaged_copy(tmp_path / "keys.safetensors", tmp_path / "bad.safetensors",
                       lambda t, m: t["k.channel_levels"].view(-1)[0].fill_(1))
    with pytest.raises(ValueError, match=r"k.channel_levels outside 2\.\."):
        Codebooks.load(bad)


def test_klt_queries_are_causal_and_survive_save_and_load(books, tmp_path):
    model, ids, b = books
    causal = b.causal_queries(3, norm="klt")
    q = replace(causal.q, sink=0)
    torch.manual_seed(4)
    x = torch.randn(2, 4, 9, 8) * 2
    together = q.apply(x, 1)
    alone = torch.cat([q.apply(x[:, :, t : t + 1], 1) for t in range(9)], dim=2)
    torch.testing.assert_close(alone, together, rtol=1e-6, atol=1e-6)  # einsum batching: float rounding only
    assert (together - x).abs().mean() < 0.5 * x.abs().mean()  # a quantizer, not noise
    path = tmp_path / "klt.safetensors"
    causal.save(path)
    loaded = Codebooks.load(path)
    torch.testing.assert_close(loaded.q.basis, causal.q.basis, rtol=0, atol=0)
    torch.testing.assert_close(loaded.q.apply(x, 1), causal.q.apply(x, 1), rtol=0, atol=0)


def test_a_damaged_basis_is_refused(books, tmp_path):
    model, ids, b = books
    path = tmp_path / "klt.safetensors"
    b.causal_queries(3, norm="klt").save(path)
    Codebooks.load(path)  # the undamaged file loads
    bad = damaged_copy(path, tmp_path / "bad.safetensors", lambda t, m: t["q.basis"].mul_(1.5))
    with pytest.raises(ValueError, match="q.basis columns are not orthonormal"):
        Codebooks.load(bad)


def test_klt_needs_the_calibration_gram():
    model, ids, b = tiny_books(norm="channel-group", group=4, sink=1, rope="pre", bits_q=3, bits_k=3)
    with pytest.raises(ValueError, match="re-run `kvquant calibrate`"):
        b.causal_queries(norm="klt")
    with pytest.raises(ValueError, match="'klt'"):
        b.causal_queries(norm="token")


def test_the_default_rule_is_klt_where_the_file_holds_the_gram(books):
    model, ids, b = books
    assert b.causal_queries(3).q.basis is not None
    old = replace(b, hist=replace(b.hist, gram_q=None))  # a file from before the Gram was captured
    with pytest.warns(UserWarning, match="no query Gram"):
        q = old.causal_queries(3).q
    assert q.basis is None and q.token_scale and q.channel_levels is not None
