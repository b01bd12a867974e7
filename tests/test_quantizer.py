"""kvquant.core.quantizer (the channel-group quantizer every path runs) and its packing by level count."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_books

from kvquant.core.groupnorm import load_scales, store_scales
from kvquant.core.packing import LEVEL_PACKING, ChannelPacking, levels_size, pack_levels
from kvquant.core.quantizer import GroupCodes, decode_groups, encode_groups


def heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1]) + torch.randn(shape[-1], generator=g) * 4


def test_eight_bit_scales_are_int8_codes_that_load_back_to_what_the_simulation_uses():
    mid, half = torch.randn(4, 3, 16) * 50, torch.rand(4, 3, 16) * 20
    mid[0, 0, 0] = half[0, 0, 0] = 0.0  # a zero channel: the reserved exponent
    m, e = store_scales(mid, half, 8)
    assert m.dtype == e.dtype == torch.int8 and int(e[0, 0, 0]) == -128
    mid_q, half_q = load_scales(m, e, 8)
    assert half_q[0, 0, 0] == 0 and mid_q[0, 0, 0] == 0
    assert (half_q >= half).all() and (half_q <= torch.maximum(half, mid.abs() * 16 / 127) * 2**0.125 * (1 + 1e-6)).all()
    assert ((mid_q - mid).abs() <= half_q / 32 * (1 + 1e-6)).all()
    m16, h16 = store_scales(mid, half, 16)
    assert m16.dtype == torch.float16
    torch.testing.assert_close(load_scales(m16, h16, 16)[1], half, rtol=2**-11, atol=0)


@pytest.mark.parametrize("budget", [0.0, 2.5])
def test_decode_of_encode_equals_the_simulated_quantizer(budget):
    """Whole groups, 8-bit scales: bit for bit the simulated path (per-head or per-channel tables)."""
    _, _, books = tiny_books(method="lambda", bits_q=4, bits_k=4, norm="channel-group", group=8, sink=0,
                             scale_bits=8, budget=budget)
    side = books.k
    x = heavy((2, 2, 24, 8))
    q = encode_groups(x, 8, 8, side.boundaries[1])
    assert q.codes.shape == x.shape and q.mid.shape == (2, 2, 3, 8) and q.mid.dtype == torch.int8
    torch.testing.assert_close(decode_groups(q, side.centers[1], 8), side.apply(x, 1), atol=0, rtol=0)
    if budget:  # a channel's codes never exceed its level count
        assert (q.codes.permute(1, 3, 0, 2).reshape(16, -1).amax(-1) < side.channel_levels[1].reshape(16)).all()


def test_encode_refuses_partial_groups_and_nan():
    b = torch.linspace(-1, 1, 15).expand(2, -1).contiguous()
    with pytest.raises(ValueError, match="whole groups"):
        encode_groups(torch.zeros(1, 2, 7, 4), 4, 8, b)
    x = torch.zeros(1, 2, 8, 4)
    x[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode_groups(x, 4, 8, b)


def test_channel_packing_round_trip_and_size():
    levels = torch.tensor(list(LEVEL_PACKING)[:8] * 2).reshape(2, 8)
    p = ChannelPacking(levels, 128)
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, int(n), (3, 256), generator=g) for n in levels.flatten()], -1)
    codes = codes.reshape(3, 256, 2, 8).permute(0, 2, 1, 3).to(torch.uint8).contiguous()
    packed = p.pack(codes)
    assert packed.shape == (3, 1, 2, p.group_bytes) and p.group_bytes == 2 * sum(levels_size(128, n) for n in levels[0].tolist())
    assert torch.equal(p.unpack(packed), codes)
    # one channel's bytes are pack_levels of its 128 codes of group 0, where its bucket says
    lv = int(levels[1, 3])
    assert pack_levels(codes[0, 1, :128, 3][None], lv).numel() == levels_size(128, lv)
    with pytest.raises(ValueError, match="levels must be one of"):
        ChannelPacking(torch.tensor([[6]]), 8)
    with pytest.raises(ValueError, match="m·128"):
        p.pack(codes[:, :, :100])


def test_group_codes_round_trip_through_the_packing():
    levels = torch.tensor([[2, 3, 5, 16], [4, 8, 3, 2]])
    bounds = torch.stack([torch.cat([torch.linspace(-1, 1, int(n) + 1)[1:-1], torch.full((16 - int(n),), float("inf"))])
                          for n in levels.flatten()]).reshape(2, 4, 15)
    x = heavy((1, 2, 16, 4))
    q = encode_groups(x, 8, 8, bounds)
    p = ChannelPacking(levels, 8)
    again = GroupCodes(p.unpack(p.pack(q.codes)), q.mid, q.half, 8)
    centers = torch.zeros(2, 4, 16)
    assert torch.equal(decode_groups(again, centers, 8), decode_groups(q, centers, 8))
