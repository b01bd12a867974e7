"""Packed codes of the static-normalisation cache layout: bit packing and center lookup
(:mod:`kvquant.cache.static_layout`). Attention read from the deployed layout's codes is tested in
tests/test_code_attention.py."""

from __future__ import annotations

import pytest
import torch

from kvquant.cache.static_layout import lookup, pack, unpack
from kvquant.core.packing import packed_size


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
