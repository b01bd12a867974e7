"""The ``channel-token`` normalisation: static per-channel (μ, σ) and one fp16 scale per token and
head that maps the token's largest |x̃| onto the codebook's outermost center (the causal query rule
of ``Codebooks.causal_queries``)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_books

import kvquant
from kvquant.codebooks import CodebookConfig, Codebooks


@pytest.fixture(scope="module")
def books():
    return tiny_books(norm="channel-token", bits_q=3, bits_k=3)


def test_counts_the_token_scale():
    assert CodebookConfig(norm="channel-token").effective_bits(4, head_dim=64) == 4.25
    assert CodebookConfig(norm="channel").effective_bits(4, head_dim=64) == 4


def test_each_token_is_quantized_from_itself_and_never_clipped(books):
    model, ids, b = books
    side = b.q
    assert side.token_scale
    x = torch.randn(2, 4, 10, 8) * side.scale[0][None, :, None] + side.offset[0][None, :, None]
    x[:, :, 3] *= 50  # one token far outside the calibrated range
    out = side.apply(x, 0)
    for t in range(1, 10):  # a prefix gives the same codes: nothing depends on later tokens
        torch.testing.assert_close(side.apply(x[:, :, :t], 0), out[:, :, :t], rtol=0, atol=0)
    # the big token keeps its size (a static codebook clips it at the outermost center)
    big = (x[:, :, 3] - side.offset[0][None]).abs().amax(-1)
    kept = (out[:, :, 3] - side.offset[0][None]).abs().amax(-1)
    assert torch.all(kept > 0.5 * big)
    static = tiny_books(norm="channel", bits_q=3, bits_k=3)[2].q
    clipped = (static.apply(x, 0)[:, :, 3] - static.offset[0][None]).abs().amax(-1)
    assert torch.all(clipped < 0.5 * big)


def test_scale_survives_save_and_load(books, tmp_path):
    model, ids, b = books
    path = tmp_path / "token.safetensors"
    b.save(path)
    loaded = Codebooks.load(path)
    assert loaded.q.token_scale and loaded.k.token_scale
    x = torch.randn(1, 4, 6, 8)
    torch.testing.assert_close(loaded.q.apply(x, 1), b.q.apply(x, 1), rtol=0, atol=0)


def test_the_cache_refuses_token_scaled_keys(books):
    model, ids, b = books
    with pytest.raises(NotImplementedError, match="channel-token"):
        kvquant.make_cache(model, b)


def test_query_quantizer_counts_the_scale():
    model, ids, b = tiny_books(norm="channel-group", group=4, sink=1, rope="pre", bits_q=3, bits_k=3)
    with pytest.warns(UserWarning, match="no Fisher weights"):  # uniform levels (tests/test_query_allocation.py)
        q = kvquant.query_quantizer(b.causal_queries(), model)
        static = kvquant.query_quantizer(b.causal_queries(norm="channel"), model)
    assert q.effective_bits() == pytest.approx(3 + 16 / 8)  # head_dim 8
    assert static.effective_bits() == 3
    with pytest.raises(ValueError, match="causal query norms"):
        b.causal_queries(norm="channel-group")
