"""Bit packing of integer codes along the last dimension (pure torch).

``bits`` in 1..8. Groups of ``g = 8 / gcd(bits, 8)`` codes fill ``g · bits / 8`` whole bytes
exactly (2 bits: 4 codes → 1 byte; 3 bits: 8 codes → 3 bytes; 4 bits: 2 codes → 1 byte),
little-endian within the group: code j of a group occupies bits ``[j·bits, (j+1)·bits)``.
"""

from __future__ import annotations

import math

import torch


def _group(bits: int) -> tuple[int, int]:
    if int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take when packed (the last group zero-padded)."""
    codes, nbytes = _group(bits)
    return -(-n // codes) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (…, n), each < 2^bits, into uint8 (…, packed_size(n, bits))."""
    per_group, nbytes = _group(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code is >= 2^{bits}; cannot pack into {bits} bits")
    n = codes.shape[-1]
    pad = (-n) % per_group
    c = torch.nn.functional.pad(codes, (0, pad)).to(torch.int64)
    c = c.reshape(*codes.shape[:-1], -1, per_group)
    shifts = torch.arange(per_group, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # (…, groups), at most 64 bits
    byte_shifts = torch.arange(nbytes, device=codes.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 (…, packed_size(n, bits)) → uint8 codes (…, n)."""
    per_group, nbytes = _group(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"expected {packed_size(n, bits)} bytes for {n} codes of {bits} bits, got {packed.shape[-1]}")
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1)
    shifts = torch.arange(per_group, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
