"""What the KV cache stores, on paper: its options (:class:`CacheOptions`), a layer's static tables
(:class:`LayerTables`), the value codebook, and the bytes per token a cache of given codebooks
holds (:func:`kv_bytes_per_token`, docs/serving.md). The layout itself is in the package docstring
(:mod:`kvquant.cache`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.core import density as dens
from kvquant.core import scalar as cb
from kvquant.core.groupnorm import SCALE_BITS, complete_tokens
from kvquant.core.int8_rows import ROW_SCALE_DTYPE
from kvquant.core.packing import packed_size
from kvquant.kernels.dispatch import DECODE_KERNELS

#: dtype of the per-token value scales (16 bits, counted in the memory).
SCALE_DTYPE = ROW_SCALE_DTYPE
#: Bytes of value scale per token and head: the fp16 RMS (``rms``) or the int8 (mid, half) (``minmax``).
_VALUE_SCALE_BYTES = 2
#: How the residual (the newest incomplete group; ``residual`` recent tokens) holds keys and values
#: until they are quantized: ``exact`` in the model's dtype; ``int8`` symmetric INT8 per token and
#: KV head with an fp16 absmax scale (8 + 16/D bits per entry), quantized from those when their
#: group completes (exact values of ``quantize_values=False`` stay exact).
TAIL_FORMATS = ("exact", "int8")


#: How values are normalised per token: ``hadamard`` — ``minmax`` of the row rotated by the
#: orthonormal Hadamard matrix, ``v H`` (:func:`kvquant.core.hadamard.hadamard`; head_dim a power of
#: two), read back as ``v̂' H``; ``minmax`` — ``(v − mid)/half`` over the head dimension on a uniform
#: grid of 2^bits levels including ±1 (asymmetric INT per token, KIVI's values), (mid, half) as 8-bit
#: codes (:func:`kvquant.core.groupnorm.store_scales`); ``rms`` — ``v / RMS`` through the ρ = 0
#: codebook, fp16 RMS. 16 bits of scale per token and head in each. make_cache's default: the first
#: where head_dim is a power of two, else ``minmax`` (:func:`default_values`; chosen on development
#: windows: eval/value_norm.py, eval/research/value_hadamard_cache.py).
VALUE_NORMS = ("hadamard", "minmax", "rms")


def default_values(head_dim: int) -> str:
    """make_cache's value normalisation for a head dimension: ``hadamard`` where it is a power of
    two (the rotation needs one), else ``minmax``."""
    return "hadamard" if head_dim & (head_dim - 1) == 0 else "minmax"


#: How a decoding step (one new token per row) reads the cache: ``codes`` — attention computed from
#: the codes by :func:`kvquant.kernels.dispatch.attend` (channel-group keys with quantized values, on
#: the CPU; other layouts and devices dequantize); ``dequantize`` — every held token dequantized to
#: the model's dtype and attended with SDPA (the reference).
DECODE_MODES = ("codes", "dequantize")


@lru_cache(maxsize=16)
def value_codebook(bits: int, values: str = "rms") -> cb.Codebook:
    """The values' codebook: ``rms``: ``compand(λ*(u; ρ = 0), 2^bits)``, in units of the token's
    RMS; ``minmax`` and ``hadamard``: 2^bits evenly spaced centers on [−1, 1]."""
    levels = cb.levels_for_bits(bits)
    if values in ("minmax", "hadamard"):
        return cb.Codebook.nearest(np.linspace(-1.0, 1.0, levels))
    return cb.compand(dens.lambda_star_density(0.0), levels)


@dataclass(frozen=True)
class CacheOptions:
    """What a :class:`KVQuantCache` stores (see the module docstring)."""

    bits_k: int = 4
    bits_v: int = 4
    quantize_values: bool = True
    residual: int = 0
    sink: int = 0
    group: int = 0  # > 0: keys normalised per channel over groups of this many tokens
    scale_bits: int = 16  # group mode: bits of each stored mid/half (kvquant.core.groupnorm.store_scales)
    values: str = "minmax"  # VALUE_NORMS: "minmax" INT per token (8-bit mid, half), "hadamard" the same on v·H, "rms"
    decode: str = "codes"  # "codes": decoding steps read the codes (kvquant.kernels.dispatch) where the layout allows; "dequantize"
    kernel: str = "auto"  # which kernel reads them (kvquant.kernels.dispatch.DECODE_KERNELS): auto = the device's
    tail: str = "int8"  # the residual's keys and values (TAIL_FORMATS): "int8" per token or "exact" (model dtype)

    def __post_init__(self) -> None:
        for name in ("bits_k", "bits_v"):
            cb.levels_for_bits(getattr(self, name))
        if self.residual < 0 or self.sink < 0 or self.group < 0:
            raise ValueError(f"residual, sink and group must be >= 0, got {self.residual}, {self.sink}, {self.group}")
        if self.scale_bits not in SCALE_BITS:
            raise ValueError(f"scale_bits must be one of {SCALE_BITS}, got {self.scale_bits!r}")
        if self.group and self.sink >= self.group:
            raise ValueError(f"sink ({self.sink}) must be smaller than group ({self.group}): sinks are kept inside group 0")
        if self.values not in VALUE_NORMS:
            raise ValueError(f"values must be one of {', '.join(VALUE_NORMS)}, got {self.values!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.kernel not in DECODE_KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(DECODE_KERNELS)}, got {self.kernel!r}")
        if self.tail not in TAIL_FORMATS:
            raise ValueError(f"tail must be one of {', '.join(TAIL_FORMATS)}, got {self.tail!r}")


def kv_bytes_per_token(config: CodebookConfig, key_code_bits: float, bits_v: int, head_dim: int, kv_heads: int,
                       layers: int, seqlen: int, tail: str = CacheOptions.tail) -> float:
    """Bytes per token (all ``layers``, one sequence) that a :class:`KVQuantCache` of codebooks
    built with ``config`` holds after ``seqlen`` tokens — :func:`make_cache`'s defaults (no
    ``residual``; values quantized, ``minmax`` or ``rms``: 16 bits of scale per token and head;
    the newest incomplete group held as ``tail``), full-attention layers, exact tokens in a 16-bit
    dtype (fp16/bf16; a float32 model holds them at 32 bits).

    Per layer and KV head, with D = ``head_dim``, T = ``seqlen``, C = tokens held as codes
    (``channel-group``: the complete groups, ``⌊T/G⌋·G``; static norms: all T), the T − C tokens
    of the newest incomplete group at R bytes per key or value (2·D exact, D + 2 ``int8``), and
    the sinks' exact copies (2·D bytes per key and per value, on top of their slots):

        keys   = D · effective_bits(key_code_bits, D, T) / 8 − (T − C)·(2·D − R) / T
                 (CodebookConfig.effective_bits: codes, 2·scale_bits/G of group mid/half, an exact
                 tail and the sinks)
        values = (C · (packed_size(D, bits_v) + _VALUE_SCALE_BYTES) + (T − C) · R + min(sink, T) · 2·D) / T
        bytes/token = layers · kv_heads · (keys + values)

    ``key_code_bits`` is the *packed* code bits per key entry of complete groups, averaged over
    layers, heads and channels — for a cache, ``8·Σ_l ChannelPacking.group_bytes / (L·G·H·D)``. With
    bit allocation this exceeds :attr:`SideBooks.mean_bits` (which counts 3 and 5 levels at 1.6
    and 2.33 bits) by the padding of each channel's G codes to whole words: ``levels_size(128, 3)``
    is 26 bytes (1.625 bits/code), ``levels_size(128, 5)`` 42 bytes (2.625 bits/code).

    Equal to :meth:`KVQuantCache.bytes_per_token` of a cache holding T tokens per row (no padding,
    so no stored int32 positions), except that decoding from codes also holds a rotation plan per
    layer for pre-RoPE keys (int64 base position per group and row: 8/G bytes per token and layer,
    plus one (r/2, G) float32 cos/sin pair per cache), which this does not count
    (tests/test_serving_accounting.py). ValueError for ``outliers`` (the cache stores none) and
    for T < G in group mode (no group is complete yet: every token is exact and the sinks are not
    yet split off, which :meth:`CodebookConfig.effective_bits` does not model)."""
    if config.outliers:
        raise ValueError(f"outliers ({config.outliers:g}) are not held by KVQuantCache; use outliers=0")
    least = config.group if config.dynamic else 1  # group mode: one complete group
    if seqlen < least:
        raise ValueError(f"seqlen must be >= {least}, got {seqlen}")
    if tail not in TAIL_FORMATS:
        raise ValueError(f"tail must be one of {', '.join(TAIL_FORMATS)}, got {tail!r}")
    quantized = complete_tokens(seqlen, config.group) if config.dynamic else seqlen
    newest = seqlen - quantized
    per_entry = head_dim + 2 if tail == "int8" else 2 * head_dim  # bytes of one key or value there
    keys = head_dim * config.effective_bits(key_code_bits, head_dim, seqlen) / 8 - newest * (2 * head_dim - per_entry) / seqlen
    values = (quantized * (packed_size(head_dim, bits_v) + _VALUE_SCALE_BYTES) + newest * per_entry
              + min(config.sink, seqlen) * 2 * head_dim) / seqlen
    return layers * kv_heads * (keys + values)


_TABLES = ("k_centers", "k_boundaries", "k_offset", "k_scale", "v_centers", "v_boundaries", "k_levels")


@dataclass
class LayerTables:
    """One layer's static tables: key codebooks ``(H_kv, K)``/``(H_kv, K−1)`` — with bit
    allocation one per channel, ``(H_kv, D, K)``/``(H_kv, D, K−1)`` and the level counts
    ``k_levels`` ``(H_kv, D)`` — key offset/scale ``(H_kv, D)`` (unused in group mode) and the
    value codebook ``(K_v,)``/``(K_v−1,)`` (float32)."""

    k_centers: torch.Tensor
    k_boundaries: torch.Tensor
    k_offset: torch.Tensor
    k_scale: torch.Tensor
    v_centers: torch.Tensor
    v_boundaries: torch.Tensor
    k_levels: torch.Tensor

    @classmethod
    def from_codebooks(cls, books: Codebooks, layer: int, options: CacheOptions) -> "LayerTables":
        vb, k = value_codebook(options.bits_v, options.values), books.k
        return cls(
            k.centers[layer].float().contiguous(),
            k.boundaries[layer].float().contiguous(),
            k.offset[layer].float().contiguous(),
            k.scale[layer].float().contiguous(),
            torch.from_numpy(vb.centers).float(),
            torch.from_numpy(vb.boundaries).float(),
            (k.channel_levels[layer] if k.channel_levels is not None
             else torch.full(k.offset.shape[1:], 2**k.bits)).long().contiguous(),
        )

    def to(self, device) -> "LayerTables":
        return LayerTables(*(getattr(self, f).to(device) for f in _TABLES))

    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in _TABLES)
