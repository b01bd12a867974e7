"""Bit packing of integer codes along the last dimension (pure torch).

``bits`` in 1..8. Groups of ``g = 8 / gcd(bits, 8)`` codes fill ``g · bits / 8`` whole bytes
exactly (2 bits: 4 codes → 1 byte; 3 bits: 8 codes → 3 bytes; 4 bits: 2 codes → 1 byte),
little-endian within the group: code j of a group occupies bits ``[j·bits, (j+1)·bits)``.

Level counts that are not powers of two (bit allocation gives channels 3 or 5 levels) pack
several codes into one word as base-K digits (:func:`pack_levels`), so 3 levels cost 1.6 bits
per code and 5 levels 2.33 instead of 2 and 3.
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
    if nbytes == 1:  # bits dividing 8: or the shifted codes into each byte in uint8 (a fast path)
        c = (torch.nn.functional.pad(codes, (0, pad)) if pad else codes).reshape(*codes.shape[:-1], -1, per_group)
        out = c[..., 0].clone()
        for j in range(1, per_group):
            out |= c[..., j] << (j * bits)
        return out
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
    if nbytes == 1:  # bits dividing 8: shift the bytes in uint8 (the same layout, a fast path)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*packed.shape[:-1], -1)
        return codes[..., :n] if codes.shape[-1] != n else codes
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1)
    shifts = torch.arange(per_group, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


#: Level counts a channel may get, each with how its codes pack: ``K: (codes per word, bits per
#: word)``. Powers of two pack one code per ``log2 K`` bits; 3 levels pack 5 codes into one byte
#: (3^5 = 243 ≤ 256: 1.6 bits per code), 5 levels 3 codes into 7 bits (125 ≤ 128: 2.33 bits).
LEVEL_PACKING = {2: (1, 1), 3: (5, 8), 4: (1, 2), 5: (3, 7), 8: (1, 3), 16: (1, 4), 32: (1, 5), 64: (1, 6),
                 128: (1, 7), 256: (1, 8)}


def _level_word(levels: int) -> tuple[int, int]:
    """``(codes per word, bits per word)`` of ``levels``-level codes; ValueError for other counts."""
    if levels not in LEVEL_PACKING:
        raise ValueError(f"levels must be one of {sorted(LEVEL_PACKING)}, got {levels!r}")
    return LEVEL_PACKING[levels]


def level_bits(levels: int) -> float:
    """Bits per code of ``levels``-level codes when packed (:data:`LEVEL_PACKING`); one level needs
    no code (0 bits: transform-coded queries drop their weakest components so)."""
    if levels == 1:
        return 0.0
    per_word, bits = _level_word(levels)
    return bits / per_word


def pack_levels(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (…, n), each < ``levels``: groups of codes per word as base-``levels``
    digits (code j of a group is digit j), words bit-packed by :func:`pack_codes`."""
    per_word, bits = _level_word(levels)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= levels:
        raise ValueError(f"a code is >= {levels}; cannot pack as {levels} levels")
    pad = (-codes.shape[-1]) % per_word
    c = torch.nn.functional.pad(codes, (0, pad)).to(torch.int64).reshape(*codes.shape[:-1], -1, per_word)
    words = (c * levels ** torch.arange(per_word, device=codes.device, dtype=torch.int64)).sum(-1)
    return pack_codes(words.to(torch.uint8), bits)


def unpack_levels(packed: torch.Tensor, levels: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels` for ``n`` codes."""
    per_word, bits = _level_word(levels)
    if per_word == 1:  # powers of two: one code per word
        return unpack_codes(packed, bits, n)
    words = unpack_codes(packed, bits, -(-n // per_word)).to(torch.int64)
    digits = (words.unsqueeze(-1) // levels ** torch.arange(per_word, device=packed.device, dtype=torch.int64)) % levels
    return digits.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def levels_size(n: int, levels: int) -> int:
    """Bytes that ``n`` codes of ``levels`` levels take when packed by :func:`pack_levels`."""
    per_word, bits = _level_word(levels)
    return packed_size(-(-n // per_word), bits)


class ChannelPacking:
    """Codes of whole groups packed channel by channel along the G tokens of each group, the
    channels of one layer bucketed by their level count (bit allocation gives each (head,
    channel) its own; :data:`LEVEL_PACKING`).

    ``levels`` (H, D) int. Layout of one group: for each level count n in increasing order, the
    channels with n levels in (head, channel) order, each as :func:`pack_levels` of its G codes
    (``levels_size(G, n)`` bytes). :meth:`pack` takes codes (B, H, m·G, D) and returns uint8
    (B, 1, m, :attr:`group_bytes`); :meth:`unpack` is its inverse.
    """

    def __init__(self, levels: torch.Tensor, group: int):
        if levels.ndim != 2:
            raise ValueError(f"levels must be (heads, head_dim), got shape {tuple(levels.shape)}")
        self.shape = tuple(levels.shape)
        self.group = group
        flat = levels.reshape(-1).long().cpu()
        self.buckets = [(int(n), (flat == n).nonzero().squeeze(1)) for n in flat.unique().tolist()]
        for n, _ in self.buckets:
            _level_word(n)
        self.group_bytes = sum(len(idx) * levels_size(group, n) for n, idx in self.buckets)

    def channel_offsets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each (head, channel)'s codes lie in a group record, for kernels that read them:
        ``(offset, levels, bits)`` int64 (H, D) — byte offset of its ``levels_size(G, n)``
        bytes, level count, bits per code for powers of two (0 for 3 and 5 levels, packed as
        base-n digits)."""
        n_ch = self.shape[0] * self.shape[1]
        off, lev, bits = (torch.zeros(n_ch, dtype=torch.long) for _ in range(3))
        start = 0
        for n, idx in self.buckets:
            size = levels_size(self.group, n)
            off[idx] = start + torch.arange(len(idx)) * size
            lev[idx] = n
            per_word, word_bits = _level_word(n)
            bits[idx] = word_bits if per_word == 1 else 0
            start += len(idx) * size
        return off.view(self.shape), lev.view(self.shape), bits.view(self.shape)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        b, h, t, d = codes.shape
        if (h, d) != self.shape or t % self.group:
            raise ValueError(f"expected codes (B, {self.shape[0]}, m·{self.group}, {self.shape[1]}), got {tuple(codes.shape)}")
        m = t // self.group
        chans = codes.reshape(b, h, m, self.group, d).permute(0, 2, 1, 4, 3).reshape(b, m, h * d, self.group)
        parts = [pack_levels(chans[:, :, idx.to(codes.device)], n).reshape(b, m, -1) for n, idx in self.buckets]
        return torch.cat(parts, dim=-1).unsqueeze(1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        b, _, m, nbytes = packed.shape
        if nbytes != self.group_bytes:
            raise ValueError(f"expected {self.group_bytes} bytes per group, got {nbytes}")
        h, d = self.shape
        chans = torch.empty(b, m, h * d, self.group, dtype=torch.uint8, device=packed.device)
        start = 0
        for n, idx in self.buckets:
            size = len(idx) * levels_size(self.group, n)
            part = packed[:, 0, :, start : start + size].reshape(b, m, len(idx), -1)
            chans[:, :, idx.to(packed.device)] = unpack_levels(part, n, self.group)
            start += size
        return chans.reshape(b, m, h, d, self.group).permute(0, 2, 1, 4, 3).reshape(b, h, m * self.group, d)
