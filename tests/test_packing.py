"""Bit packing of integer codes (kvquant.core.packing)."""

from __future__ import annotations

import math

import pytest
import torch

from kvquant.core.packing import (
    LEVEL_PACKING,
    level_bits,
    pack_codes,
    pack_levels,
    packed_size,
    unpack_codes,
    unpack_levels,
)

ALL_BITS = list(range(1, 9))


def _group(bits: int) -> tuple[int, int]:
    """(codes per group, bytes per group), computed independently of the module."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def _random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 64, 100, 257])
def test_pack_unpack_roundtrip(bits: int, n: int) -> None:
    codes = _random_codes((n,), bits, seed=1000 * bits + n)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_size(n, bits),)
    out = unpack_codes(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_unpack_roundtrip_batched(bits: int) -> None:
    # leading dims are kept; packing runs along the last one (length not a multiple of 8)
    codes = _random_codes((2, 3, 4, 37), bits, seed=bits)
    packed = pack_codes(codes, bits)
    assert packed.shape == (2, 3, 4, packed_size(37, bits))
    assert torch.equal(unpack_codes(packed, bits, 37), codes)
    # each row packs on its own: the same as packing that row alone
    assert torch.equal(packed[1, 2, 3], pack_codes(codes[1, 2, 3], bits))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extreme_codes_roundtrip(bits: int) -> None:
    top = 2**bits - 1
    for value in (0, top):
        codes = torch.full((23,), value, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 23), codes)
    alternating = torch.tensor([0, top] * 12, dtype=torch.uint8)[:23]
    assert torch.equal(unpack_codes(pack_codes(alternating, bits), bits, 23), alternating)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 16, 100, 1001])
def test_packed_size_is_bytes_rounded_to_group(bits: int, n: int) -> None:
    per_group, group_bytes = _group(bits)
    groups = math.ceil(n / per_group)
    assert packed_size(n, bits) == groups * group_bytes
    # never less than the information content, never more than one group of padding
    assert math.ceil(n * bits / 8) <= packed_size(n, bits) < math.ceil(n * bits / 8) + group_bytes
    if n % per_group == 0:
        assert packed_size(n, bits) == n * bits // 8
    # and it is what pack_codes actually produces
    assert pack_codes(torch.zeros(n, dtype=torch.uint8), bits).shape[-1] == packed_size(n, bits)


def test_packed_size_known_values() -> None:
    assert packed_size(8, 1) == 1
    assert packed_size(9, 1) == 2
    assert packed_size(4, 2) == 1
    assert packed_size(5, 2) == 2
    assert packed_size(8, 3) == 3
    assert packed_size(9, 3) == 6  # 3-bit codes come in groups of 8 codes / 3 bytes
    assert packed_size(3, 4) == 2
    assert packed_size(1, 5) == 5
    assert packed_size(10, 8) == 10


def test_bit_layout_little_endian_within_group() -> None:
    # 2 bits: code j of a group occupies bits [2j, 2j+2) of the byte
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # 4 bits: low nibble first
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    # 1 bit: LSB first
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0x81]
    # 3 bits: 8 codes -> 24-bit little-endian word
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * j) for j, c in enumerate(codes))
    expected = [(word >> (8 * k)) & 0xFF for k in range(3)]
    assert pack_codes(torch.tensor(codes, dtype=torch.uint8), 3).tolist() == expected
    # 8 bits: identity
    raw = torch.tensor([0, 17, 255, 128], dtype=torch.uint8)
    assert torch.equal(pack_codes(raw, 8), raw)


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_too_large_raises(bits: int) -> None:
    codes = torch.zeros(10, dtype=torch.uint8)
    codes[7] = 2**bits  # one past the largest code
    with pytest.raises(ValueError, match="2\\^"):
        pack_codes(codes, bits)
    codes[7] = 255
    with pytest.raises(ValueError):
        pack_codes(codes, bits)


@pytest.mark.parametrize("bits", [0, 9, 2.5, -1])
def test_invalid_bits_raise(bits) -> None:
    with pytest.raises(ValueError, match="bits"):
        packed_size(4, bits)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_wrong_dtypes_raise() -> None:
    with pytest.raises(TypeError):
        pack_codes(torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(1, dtype=torch.int32), 2, 4)


def test_unpack_wrong_byte_count_raises() -> None:
    packed = pack_codes(torch.zeros(9, dtype=torch.uint8), 3)  # 6 bytes
    with pytest.raises(ValueError):
        unpack_codes(packed[:-1], 3, 9)
    with pytest.raises(ValueError):
        unpack_codes(packed, 3, 17)  # 17 codes need 9 bytes


@pytest.mark.parametrize("levels", sorted(LEVEL_PACKING))
@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 15, 16, 100])
def test_level_packing_roundtrip_and_size(levels: int, n: int) -> None:
    g = torch.Generator().manual_seed(levels * 1000 + n)
    codes = torch.randint(0, levels, (3, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_levels(codes, levels)
    assert torch.equal(unpack_levels(packed, levels, n), codes)
    per_word, bits = LEVEL_PACKING[levels]
    assert levels**per_word <= 2**bits  # a word holds its digits
    assert level_bits(levels) == bits / per_word
    assert packed.shape[-1] == packed_size(-(-n // per_word), bits)


def test_level_packing_costs_and_errors() -> None:
    assert level_bits(3) == 1.6 and level_bits(5) == pytest.approx(7 / 3) and level_bits(16) == 4
    with pytest.raises(ValueError, match="levels"):
        level_bits(6)
    with pytest.raises(ValueError, match=">= 3"):
        pack_levels(torch.tensor([0, 3], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="levels"):
        unpack_levels(torch.zeros(1, dtype=torch.uint8), 7, 1)
