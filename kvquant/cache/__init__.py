"""A quantized KV cache for ``generate()``: keys as packed codes of the model's calibrated key
codebooks (the simulation's quantizer, :mod:`kvquant.core.quantizer`), values as asymmetric INT codes
per token (or the ρ = 0 codebook with an RMS scale per token).

    books = kvquant.calibrate(model, windows)
    cache = make_cache(model, books)                       # keys: the books'; values: their bits_v (else the keys' mean)
    kvquant.wrap(model, query_quantizer(books.causal_queries(), model))  # optional: quantized queries too
    out = model.generate(ids, **kvquant.cache_kwargs(cache), max_new_tokens=64)  # cache= (5.24+) or past_key_values=
    cache.bytes_per_token(), cache.memory_bytes()

**Keys, static normalisation** (``norm`` ``head``/``channel``). Layer ``l``, KV head ``h``:
``x̃ = (k − offset[l,h]) / scale[l,h]`` per channel, ``code = #{boundaries[l,h] ≤ x̃}`` (exactly
:meth:`kvquant.codebooks.SideBooks.apply`), packed along head_dim with :mod:`kvquant.core.packing`.
The dequantized keys ``centers[code]·scale + offset`` are bit-identical to the simulated path.

**Keys, dynamic ``channel-group`` normalisation** (``SideBooks.group = G > 0``): every complete
group of G consecutive tokens (aligned at the first token, as blocks of a paged cache) is quantized by
:func:`kvquant.core.quantizer.encode_groups` — per-channel ``mid``/``half`` stored in the codebooks'
``scale_bits`` (fp16 or the 8-bit format, counted), codes of the head's codebook or, with bit
allocation, of each channel's own — and its codes packed channel by channel along the group's
tokens, channels bucketed by level count (:class:`kvquant.core.packing.ChannelPacking`: 3 and 5
levels at 1.6 and 2.33 bits). A group is quantized once complete (KIVI's layout): until then its
tokens are the residual, so between ``residual`` and ``residual + G − 1`` recent tokens are not
yet codes. ``tail`` (:data:`TAIL_FORMATS`) says how the residual holds their keys and values:
``int8`` (the default: per token and KV head with an fp16 absmax scale, 8 + 16/D bits per entry;
the group is quantized from those INT8 entries when it completes) or ``exact`` (the model's
dtype; the rule of the simulated path, :func:`kvquant.core.groupnorm.causal_groups`: the keys the
cache holds after T tokens are bit-identical to ``SideBooks.apply`` of those T keys).

**Values** (quantized with the keys, when their group completes). ``values="minmax"`` (the
default): per token and KV head, ``mid``/``half`` of the values over head_dim stored as 8-bit codes,
``(v − mid)/half`` on 2^bits_v evenly spaced levels including ±1 — asymmetric INT per token (KIVI's
values), through :func:`kvquant.core.quantizer.encode_groups` along head_dim. ``values="rms"``: ``r =
RMS over head_dim`` stored as fp16, ``v / r`` quantized with ``compand(λ*(u; ρ=0), 2^bits_v)``
(Panter–Dite for a unit Gaussian; +11% perplexity at 4 bits on SmolLM2 where minmax costs +0.04%,
eval/value_norm.py). ``quantize_values=False`` keeps values exact (in the model's dtype).

**Exact tokens.** ``sink`` (default: the codebooks' own ``sink``; < G in group mode): the first
tokens a full-attention layer sees stay exact (with left padding these are pad tokens). They keep
their code slots (in group mode they are left out of group 0's range) and an exact copy, taken
as they arrive, is laid over them when read, so the layout stays whole groups from token 0.
``residual``: the most recent tokens stay out of the codes (held as ``tail`` says). Sliding-window layers (Mistral, Gemma3, Qwen2 ``max_window_layers``) keep
the last ``window − 1`` tokens (in group mode also the rest of a partly expired group and the
incomplete group, so at most ``window − 1 + 2G − 2 + residual``), and
return what transformers' ``DynamicSlidingWindowLayer`` returns; their sinks expire with the
window.

**Re-quantization.** A model wrapped with full codebooks (``kvquant.wrap(model, books)``)
quantizes the keys its attention receives again. For static nearest-centre codebooks
(``lambda``, ``lloydmax``, ``uniform``) a dequantized key maps back to the same center, so this
is a no-op (exact sink/residual keys would be quantized, though); in ``channel-group`` mode it
is not (the group's min/max change). :func:`query_quantizer` quantizes only the queries: use it
with this cache.

**Rollback** (``crop``, what assisted decoding and chat editing call). With past recording on
(``activate_past_recording``; transformers' assisted decoding turns it on), each layer keeps
exact copies of its last update until the next one or a crop; a crop inside that update puts
the layer back as it was before it and appends the kept tokens again, so it equals a layer fed
only them. Any other crop keeps the kept tokens' keys and values as they were served (in group
mode the kept part of a split group goes back to the residual as served — INT8 again with the
``int8`` tail: within half a step —: its originals are gone).

**Decoding steps** (one new token per row, ``decode="codes"``, channel-group keys with quantized
values, CPU): kvquant's attention pre-hook tells the layer a step is coming
(:meth:`KVQuantCache.kvquant_begin_step`); ``update`` appends the token and returns zero-stride
placeholders, and the attention function calls :meth:`_QuantKV.decode_attention`, which reads
the codes (:func:`kvquant.kernels.dispatch.attend`) — no held token is dequantized. Prefill and
other layouts dequantize (``_materialize``), as ``decode="dequantize"`` does every step.

Memory: :meth:`KVQuantCache.memory_bytes` sums the storage of every tensor the layers hold
(key codes, group mid/half, value codes and scales, exact sink/residual tokens, stored positions,
the rotation tables decoding from codes keeps), each storage once; the static tables (centers,
boundaries, offsets, scales; :meth:`KVQuantCache.table_bytes`) are per model. :func:`kv_bytes_per_token`
gives the same bytes per token on paper, for any model geometry and sequence length (docs/serving.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvquant.core import density as dens
from kvquant.core import scalar as cb
from kvquant.kernels.dispatch import DECODE_KERNELS, step_kernel
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.hf.compat import WINDOWED_LAYER_TYPES, DummyLayer, cache_layer_types
from kvquant.cache.static_layout import dequantize_keys, dequantize_values, pack, unpack
from kvquant.core.groupnorm import SCALE_BITS, causal_groups, complete_tokens
from kvquant.core.packing import ChannelPacking, packed_size
from kvquant.core.quantizer import GroupCodes, decode_groups, encode_groups
from kvquant.core.rope import derotate, rotate

__all__ = [
    "CacheOptions",
    "KVQuantCache",
    "KVQuantLayer",
    "KVQuantSlidingLayer",
    "LayerTables",
    "QueryQuantizer",
    "kv_bytes_per_token",
    "make_cache",
    "query_quantizer",
    "value_codebook",
]

#: dtype of the per-token value scales (16 bits, counted in the memory).
SCALE_DTYPE = torch.float16
#: Bytes of value scale per token and head: the fp16 RMS (``rms``) or the int8 (mid, half) (``minmax``).
_VALUE_SCALE_BYTES = 2
_SCALE_MIN, _SCALE_MAX = 2.0**-24, 65504.0
#: How the residual (the newest incomplete group; ``residual`` recent tokens) holds keys and values
#: until they are quantized: ``exact`` in the model's dtype; ``int8`` symmetric INT8 per token and
#: KV head with an fp16 absmax scale (8 + 16/D bits per entry), quantized from those when their
#: group completes (exact values of ``quantize_values=False`` stay exact).
TAIL_FORMATS = ("exact", "int8")


#: How values are normalised per token: ``minmax`` — ``(v − mid)/half`` over the head dimension on
#: a uniform grid of 2^bits levels including ±1 (asymmetric INT per token, KIVI's values), (mid,
#: half) as 8-bit codes (:func:`kvquant.core.groupnorm.store_scales`); ``rms`` — ``v / RMS`` through the
#: ρ = 0 codebook, fp16 RMS. 16 bits of scale per token and head either way.
VALUE_NORMS = ("minmax", "rms")  # the first is make_cache's default (selected on development windows: eval/value_norm.py)


#: How a decoding step (one new token per row) reads the cache: ``codes`` — attention computed from
#: the codes by :func:`kvquant.kernels.dispatch.attend` (channel-group keys with quantized values, on
#: the CPU; other layouts and devices dequantize); ``dequantize`` — every held token dequantized to
#: the model's dtype and attended with SDPA (the reference).
DECODE_MODES = ("codes", "dequantize")


@lru_cache(maxsize=16)
def value_codebook(bits: int, values: str = "rms") -> cb.Codebook:
    """The values' codebook: ``rms``: ``compand(λ*(u; ρ = 0), 2^bits)``, in units of the token's
    RMS; ``minmax``: 2^bits evenly spaced centers on [−1, 1]."""
    levels = cb.levels_for_bits(bits)
    if values == "minmax":
        return cb.Codebook.nearest(np.linspace(-1.0, 1.0, levels))
    return cb.compand(dens.lambda_star_density(0.0), levels)


def kv_bytes_per_token(config: CodebookConfig, key_code_bits: float, bits_v: int, head_dim: int, kv_heads: int,
                       layers: int, seqlen: int, tail: str = "int8") -> float:
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
    values: str = "minmax"  # "minmax": INT per token (8-bit mid, half); "rms": ρ = 0 codebook × fp16 RMS per token
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


# Per-layer storage, in token order: [quantized | residual (exact)], plus sink_k/sink_v: exact copies
# of the first held quantized tokens while they are the stream's first ``sink`` tokens. Values are
# per token; keys per token (static normalisation: k_codes (B, H, n, bytes)) or per group (group
# mode: k_codes (B, 1, n/G, bytes) and k_mid/k_half (B, H, n/G, D)).
# Pre-RoPE keys (``rope="pre"`` codebooks): the quantized keys are stored before the rotation and
# rotated at their positions when read: the stream indices while the position ids equal them
# (nothing stored), else k_pos (B, 1, n) and res_pos (B, 1, r), the position ids of the quantized
# and residual tokens (int32, counted).
_STORE = ("sink_k", "sink_v", "k_codes", "k_mid", "k_half", "v_codes", "v_scale", "k_pos", "res_k", "res_k_scale",
          "res_v", "res_v_scale", "res_pos")
_PER_TOKEN_Q = ("v_codes", "v_scale", "k_pos")
_PER_GROUP_K = ("k_codes", "k_mid", "k_half")
_RESIDUAL = ("res_k", "res_k_scale", "res_v", "res_v_scale", "res_pos")


def _slice(t: torch.Tensor | None, start: int | None, stop: int | None) -> torch.Tensor | None:
    """``t[:, :, start:stop]`` as a fresh tensor, so the dropped part's storage is freed."""
    return None if t is None else t[:, :, start:stop].clone()


class LayerRope:
    """Where a layer with pre-RoPE keys gets positions and rotary tables: the ``position_ids`` its
    attention module was called with in the current forward (stashed by kvquant's forward
    pre-hook, which :func:`kvquant.wrap` installs) and the model's own rotary embedding at any
    positions (:func:`kvquant.hf.wrap.rotary_tables`)."""

    def __init__(self, module: torch.nn.Module, tables: Callable, layer: int, shared: dict | None = None):
        self.module, self._tables, self.layer = module, tables, layer
        self._shared = {} if shared is None else shared  # one per cache: tables its layers share

    def __deepcopy__(self, memo: dict) -> "LayerRope":
        # a copied cache (e.g. copy.deepcopy of a prefilled prompt cache) reads the same model's
        # modules and rotary embedding, not copies of them; the shared tables are never written
        return LayerRope(self.module, self._tables, self.layer, self._shared)

    def delta_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's ``a·cos(θδ)``, ``a·sin(θδ)`` for δ = 0 … n−1 as (r/2, n) float32, one copy per
        cache and rotary embedding (layers of the same rope share it)."""
        inv_freq, a = self.frequencies()
        key = (inv_freq.data_ptr(), a, n)
        if key not in self._shared:
            cos, sin = self.tables(torch.arange(n).unsqueeze(0))  # (1, n, r)
            rh = cos.shape[-1] // 2
            self._shared[key] = (cos[0, :, :rh].T.contiguous(), sin[0, :, :rh].T.contiguous())
        return self._shared[key]

    def positions(self, batch: int, n: int) -> torch.Tensor:
        """Position ids (B, 1, n) int32 of the ``n`` tokens this layer is being updated with."""
        pos = getattr(self.module, "kvquant_positions", None)
        if pos is None or pos.shape[-1] != n:
            raise RuntimeError(
                f"layer {self.layer}: the attention module was not called with the position_ids of the {n} new tokens "
                "(was the model unwrapped after make_cache?); a cache of pre-RoPE keys needs them to rotate keys back"
            )
        return pos.expand(batch, n).to(torch.int32).unsqueeze(1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` (B, n, r) float32 at ``positions`` (B, n)."""
        return self._tables(self.layer, positions.long())

    def frequencies(self) -> tuple[torch.Tensor, float]:
        """``(inv_freq (r/2,), attention_scaling)`` of this layer's rotary embedding."""
        return self._tables.frequencies(self.layer)


@dataclass
class _Undo:
    """What a layer needs to take back its last update: the state before it (held tokens as
    codes, exact sink copies, the residual tensors, the stream index, whether positions were
    stored) and the update's own keys, values (B, H, n, D) and position ids (B, 1, n) as given.
    Kept only while past recording is on; its tensors are counted in the layer's memory."""

    quantized: int
    sinks: int
    residual: tuple
    seen: int
    positions_stored: bool
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    @classmethod
    def of(cls, layer: "_QuantKV", k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> "_Undo":
        return cls(layer.quantized_tokens, layer.sink_k.shape[2], tuple(getattr(layer, n) for n in _RESIDUAL),
                   layer._seen, layer.k_pos is not None, k.clone(), v.clone(), None if pos is None else pos.clone())

    def restore(self, layer: "_QuantKV") -> None:
        """Put ``layer`` back as it was before the update (codes appended since are sliced off)."""
        layer._slice_quantized(None, self.quantized)
        layer.sink_k, layer.sink_v = _slice(layer.sink_k, None, self.sinks), _slice(layer.sink_v, None, self.sinks)
        for name, t in zip(_RESIDUAL, self.residual):
            setattr(layer, name, t)
        layer._seen = self.seen
        if not self.positions_stored:
            layer.k_pos = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.residual, self.k, self.v, self.pos) if t is not None]


class _QuantKV:
    """Storage and operations shared by the full-attention and sliding-window layers."""

    def _setup(self, tables: LayerTables, options: CacheOptions, sink: int, rope: LayerRope | None) -> None:
        self.tables = tables
        self.rope = rope
        self.options = options
        self.sink_cap = sink
        self.group = options.group
        self.packing = ChannelPacking(tables.k_levels, options.group) if options.group else None
        # decoding from codes (kvquant.kernels.dispatch): the layout it reads, the step's state
        self.reads_codes = (options.decode == "codes" and options.group > 0 and options.group % 8 == 0
                            and options.quantize_values and tables.k_offset.shape[-1] % 8 == 0)
        self._channel_layout = self._channel_tables() if self.packing else None
        self._wants_codes = False  # set by begin_step for the next update
        self._step_kernel = None  # the kernel reading a step from the codes (lazy_initialization: the device's)
        self.step_pending: int | None = None  # an update deferred its attention: the first visible token
        self._plan = None
        self._dev_tables: LayerTables | None = None
        self._seen = 0  # tokens appended so far, less those cropped (stream index of the next one)
        self._clear()
        # transformers' assisted decoding calls activate_past_recording, then crops the rejected drafts
        self.record_past = False
        self.is_croppable = True

    # --- storage --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        super().lazy_initialization(key_states, value_states)  # empty keys/values, is_initialized
        # Kept here, not left to the base class: transformers 5.24's DynamicLayer stopped setting dtype.
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if h != self.tables.k_centers.shape[0] or d != self.tables.k_offset.shape[-1]:
            raise ValueError(
                f"layer gets {h} KV heads × {d} dims, the codebooks are for "
                f"{self.tables.k_centers.shape[0]} × {self.tables.k_offset.shape[-1]}"
            )
        self.head_dim = d
        dev, dt, o = key_states.device, key_states.dtype, self.options
        if self.reads_codes:
            self._step_kernel = step_kernel(o.kernel, dev, o.group)[0]  # None: steps dequantize
        e = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.sink_k, self.sink_v = e(b, h, 0, d), e(b, h, 0, d)
        if self.group:
            self.k_codes = e(b, 1, 0, self.packing.group_bytes, dtype=torch.uint8)
            sd = torch.float16 if o.scale_bits == 16 else torch.int8
            self.k_mid, self.k_half = e(b, h, 0, d, dtype=sd), e(b, h, 0, d, dtype=sd)
        else:
            self.k_codes = e(b, h, 0, packed_size(d, o.bits_k), dtype=torch.uint8)
        if o.quantize_values:
            self.v_codes = e(b, h, 0, packed_size(d, o.bits_v), dtype=torch.uint8)
            self.v_scale = e(b, h, 0, dtype=SCALE_DTYPE) if o.values == "rms" else e(b, h, 0, 2, dtype=torch.int8)
        else:
            self.v_codes, self.v_scale = e(b, h, 0, d), None
        if o.tail == "int8":
            self.res_k, self.res_k_scale = e(b, h, 0, d, dtype=torch.int8), e(b, h, 0, dtype=SCALE_DTYPE)
            if o.quantize_values:
                self.res_v, self.res_v_scale = e(b, h, 0, d, dtype=torch.int8), e(b, h, 0, dtype=SCALE_DTYPE)
            else:
                self.res_v = e(b, h, 0, d)
        else:
            self.res_k, self.res_v = e(b, h, 0, d), e(b, h, 0, d)
        # pre-RoPE positions: k_pos/res_pos stay None (the stream index) until a row departs from it
        self._dev_tables = self.tables.to(dev)

    @property
    def held_tokens(self) -> int:
        if not self.is_initialized or self.k_codes is None:
            return 0
        return self.quantized_tokens + self.res_k.shape[2]

    @property
    def quantized_tokens(self) -> int:
        """Tokens held as codes (values are stored per token in both modes)."""
        return self.v_codes.shape[2]

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in _STORE) if t is not None]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._plan = None
        self._undo = None  # rows moved: a later crop keeps what is served (_drop_back)
        for name in _STORE:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def _clear(self) -> None:
        self._plan = None
        self._undo = None
        for name in _STORE:
            setattr(self, name, None)

    # --- quantization ---------------------------------------------------------------
    def _quantize_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Packed codes (and per-group stored mid/half in group mode) of keys ``k`` (B, H, n, D);
        in group mode n is a multiple of the group size."""
        t = self._dev_tables
        if not self.group:
            off, sc = t.k_offset[None, :, None, :], t.k_scale[None, :, None, :]
            return pack(cb.quantize((k.float() - off) / sc, t.k_boundaries, dim=1), self.options.bits_k), None, None
        q = encode_groups(k, self.group, self.options.scale_bits, t.k_boundaries)
        return self.packing.pack(q.codes), q.mid, q.half

    def _dequantize_keys(self, codes: torch.Tensor, mid: torch.Tensor | None,
                         half: torch.Tensor | None) -> torch.Tensor:
        t, d = self._dev_tables, self.head_dim
        if not self.group:
            return dequantize_keys(codes, t.k_centers, t.k_offset, t.k_scale, self.options.bits_k, d)
        q = GroupCodes(self.packing.unpack(codes), mid, half, self.options.scale_bits)
        return decode_groups(q, t.k_centers, self.group)

    def _quantize_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._dev_tables
        if self.options.values == "minmax":  # the group quantizer along head_dim: one group per token
            b, h, n, d = v.shape
            q = encode_groups(v.transpose(2, 3), d, 8, t.v_boundaries.expand(h, -1))
            codes = q.codes.transpose(2, 3).contiguous()
            return pack(codes, self.options.bits_v), torch.stack([q.mid[:, :, 0], q.half[:, :, 0]], dim=-1)
        vf = v.float()
        scale = vf.square().mean(-1).sqrt().clamp(_SCALE_MIN, _SCALE_MAX).to(SCALE_DTYPE)
        vn = vf / scale.float().unsqueeze(-1)
        codes = cb.quantize(vn, t.v_boundaries.expand(v.shape[1], -1), dim=1)
        return pack(codes, self.options.bits_v), scale

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized segment, dequantized to the model's dtype, the sinks exact."""
        t, o = self._dev_tables, self.options
        k = self._dequantize_keys(self.k_codes, self.k_mid, self.k_half)
        if self.rope is not None:  # stored before the rotation: rotated at the tokens' positions
            k = rotate(k, *self.rope.tables(self._quantized_positions()))
        k = k.to(self.dtype)
        if o.quantize_values and o.values == "minmax":
            codes = unpack(self.v_codes, o.bits_v, self.head_dim).transpose(2, 3)
            q = GroupCodes(codes, self.v_scale[..., 0].unsqueeze(2), self.v_scale[..., 1].unsqueeze(2), 8)
            h = codes.shape[1]
            # contiguous: SDPA takes its fast (flash) CPU kernel only for a unit stride along head_dim
            v = decode_groups(q, t.v_centers.expand(h, -1), self.head_dim).transpose(2, 3).to(self.dtype).contiguous()
        elif o.quantize_values:
            v = dequantize_values(self.v_codes, t.v_centers, self.v_scale, o.bits_v, self.head_dim).to(self.dtype)
        else:
            v = self.v_codes
        m = min(self.sink_k.shape[2], k.shape[2])
        if m:  # the exact sinks over their code slots (k and quantized v are fresh tensors here)
            k[:, :, :m] = self.sink_k[:, :, :m]
            if o.quantize_values:
                v[:, :, :m] = self.sink_v[:, :, :m]
        return k, v

    def _encode_tail(self, x: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys or values (B, H, n, D) as the residual holds them (``options.tail``, or ``exact``):
        as given, or INT8 codes ``round(x / s)`` with ``s = max|x| / 127`` per token and head in
        fp16 (B, H, n)."""
        if exact or self.options.tail == "exact":
            return x, None
        xf = x.float()
        scale = (xf.abs().amax(-1) / 127).clamp(_SCALE_MIN, _SCALE_MAX).to(SCALE_DTYPE)
        return (xf / scale.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scale

    def _decode_tail(self, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`_encode_tail` holds, in the model's dtype."""
        return codes if scale is None else (codes.float() * scale.float().unsqueeze(-1)).to(self.dtype)

    def _residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual's keys and values (B, H, r, D) in the model's dtype, sinks still there as
        their exact copies."""
        k, v = self._decode_tail(self.res_k, self.res_k_scale), self._decode_tail(self.res_v, self.res_v_scale)
        q, m = self.quantized_tokens, self.sink_k.shape[2]
        if self.options.tail == "int8" and m > q:  # k (and quantized v) are fresh tensors here
            k[:, :, : m - q] = self.sink_k[:, :, q:m]
            if self.res_v_scale is not None:
                v[:, :, : m - q] = self.sink_v[:, :, q:m]
        return k, v

    # --- token operations -------------------------------------------------------------
    def _stream(self, start: int, n: int, batch: int) -> torch.Tensor:
        """Positions (B, 1, n) int32 equal to the stream indices ``start … start + n − 1``."""
        return torch.arange(start, start + n, dtype=torch.int32, device=self.device).expand(batch, 1, n)

    def _quantized_positions(self) -> torch.Tensor:
        """Positions (B, n) of the quantized tokens: stored, or their stream indices."""
        if self.k_pos is not None:
            return self.k_pos[:, 0]
        return self._stream(self._seen - self.held_tokens, self.quantized_tokens, self.k_codes.shape[0])[:, 0]

    def _track_positions(self, k: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor | None:
        """Positions (B, 1, n) of the ``n`` tokens being appended if they must be stored, else None.

        Keys of pre-RoPE codebooks need their positions when read. While every row's position
        ids are the tokens' stream indices (no padding) nothing is stored (0 bytes); from the first
        step that departs (left padding, custom position_ids) the positions of all held tokens
        are stored as int32 (counted)."""
        b, n = k.shape[0], k.shape[2]
        pos = self.rope.positions(b, n) if pos is None else pos
        if self.k_pos is None and not torch.equal(pos, self._stream(self._seen, n, b)):
            self.k_pos = self._stream(self._seen - self.held_tokens, self.quantized_tokens, b).clone()
            self.res_pos = self._stream(self._seen - self.res_k.shape[2], self.res_k.shape[2], b).clone()
        return pos if self.k_pos is not None else None

    def _append(self, k: torch.Tensor, v: torch.Tensor, given_pos: torch.Tensor | None = None) -> None:
        """Append ``n`` tokens' keys and values (B, H, n, D) as given to the layer (post-RoPE);
        ``given_pos`` (B, 1, n): their position ids, else those the attention module was called
        with (pre-RoPE codebooks only). While past recording is on, what a :meth:`crop` of these
        tokens needs to replay them exactly is kept (:class:`_Undo`)."""
        if self.rope is not None:
            given_pos = self.rope.positions(k.shape[0], k.shape[2]) if given_pos is None else given_pos
        self._undo = _Undo.of(self, k, v, given_pos) if self.record_past else None
        pos = self._track_positions(k, given_pos) if self.rope is not None else None
        first_new = self._seen  # stream index of k[:, :, 0]
        self._seen += k.shape[2]
        take = min(max(self.sink_cap - first_new, 0), k.shape[2])
        if take:  # exact copies of the sinks, laid over their slots when read
            self.sink_k = torch.cat([self.sink_k, k[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :take]], dim=2)
        (ck, sk), (cv, sv) = self._encode_tail(k), self._encode_tail(v, exact=not self.options.quantize_values)
        cat = lambda a, b: None if b is None else torch.cat([a, b], dim=2)  # noqa: E731
        res = dict(zip(_RESIDUAL, (cat(self.res_k, ck), cat(self.res_k_scale, sk), cat(self.res_v, cv),
                                   cat(self.res_v_scale, sv), cat(self.res_pos, pos))))
        over = res["res_k"].shape[2] - self.options.residual
        if self.group:
            over = over // self.group * self.group  # whole groups only
        if over > 0:
            first = self._seen - res["res_k"].shape[2]  # stream index of the residual; in group mode a multiple of G
            head = {n: None if t is None else t[:, :, :over] for n, t in res.items()}
            keys = self._decode_tail(head["res_k"], head["res_k_scale"])
            values = self._decode_tail(head["res_v"], head["res_v_scale"])
            if self.rope is not None:
                at = head["res_pos"][:, 0] if pos is not None else self._stream(first, over, keys.shape[0])[:, 0]
                keys = derotate(keys, *self.rope.tables(at))
                if pos is not None:
                    self.k_pos = torch.cat([self.k_pos, head["res_pos"]], dim=2)
            if self.group and first == 0:  # the sinks are left out of group 0's range, as simulated
                keys = causal_groups(keys, self.group, self.sink_cap)
            codes, mid, half = self._quantize_keys(keys)
            self.k_codes = torch.cat([self.k_codes, codes], dim=2)
            if self.group:
                self.k_mid = torch.cat([self.k_mid, mid], dim=2)
                self.k_half = torch.cat([self.k_half, half], dim=2)
            if self.options.quantize_values:
                vcodes, scale = self._quantize_values(values)
                self.v_codes = torch.cat([self.v_codes, vcodes], dim=2)
                self.v_scale = torch.cat([self.v_scale, scale], dim=2)
            else:
                self.v_codes = torch.cat([self.v_codes, values], dim=2)
            res = {n: _slice(t, over, None) for n, t in res.items()}
        for name, t in res.items():
            setattr(self, name, t)

    # --- decoding from codes ----------------------------------------------------------
    def _channel_tables(self) -> tuple[torch.Tensor, ...]:
        """``(offset, levels, bits, centers)``: where each (head, channel)'s codes lie in a group
        record (:meth:`ChannelPacking.channel_offsets`) and its centers (H, D, K) float32."""
        c = self.tables.k_centers
        h, d = self.tables.k_offset.shape
        centers = c if c.ndim == 3 else c[:, None, :].expand(h, d, c.shape[-1])
        return (*self.packing.channel_offsets(), centers.float().contiguous())

    def begin_step(self, q_len: int) -> bool:
        """Called before the attention module's forward (kvquant's pre-hook) with its query
        length: for one new token, if this layer reads codes, the next :meth:`update` returns
        placeholders and the attention calls :meth:`decode_attention`."""
        self._wants_codes = q_len == 1 and self.reads_codes
        return self._wants_codes

    def _defer(self, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholders (zero-stride) of the ``visible`` last held tokens' shape; the step waits
        for :meth:`decode_attention`."""
        self._wants_codes = False
        self.step_pending = self.held_tokens - visible
        b, h = self.res_k.shape[:2]
        p = torch.zeros((), dtype=self.dtype, device=self.device).expand(b, h, visible, self.head_dim)
        return p, p

    def _deferrable(self) -> bool:
        return self._wants_codes and self._step_kernel is not None

    def decode_attention(self, query: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None) -> torch.Tensor:
        """The deferred step's attention (B, 1, H_q, D), read from the codes by the layer's kernel
        (:func:`kvquant.kernels.dispatch.step_kernel`: C on the CPU, Triton on CUDA)."""
        start, self.step_pending = self.step_pending, None
        if start is None:
            raise RuntimeError("decode_attention without a deferred update (begin_step, then update, first)")
        out = self._step_kernel(self, query, attention_mask, scaling, start)
        self._end_step()
        return out

    def _end_step(self) -> None:
        """What update leaves to after the attention (sliding layers: drop expired tokens)."""

    def _rotation_plan(self):
        from kvquant.kernels.dispatch import RotationPlan

        key = (self._seen - self.held_tokens, self.quantized_tokens, self.k_codes.shape[0], self.k_pos is not None)
        if self._plan is None or self._plan.key != key:
            self._plan = RotationPlan.build(self, key)
        return self._plan

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held tokens as (B, H_kv, S, D) keys and values in the model's dtype."""
        if not self.quantized_tokens:
            return self._residual()
        k, v = self._dequantized()
        if not self.res_k.shape[2]:
            return k, v
        rk, rv = self._residual()
        return torch.cat([k, rk], dim=2), torch.cat([v, rv], dim=2)

    def _slice_quantized(self, start: int | None, stop: int | None) -> None:
        """Keep quantized tokens ``[start:stop]`` (group mode: whole groups)."""
        self._plan = None
        for name in _PER_TOKEN_Q:
            setattr(self, name, _slice(getattr(self, name), start, stop))
        if self.group:
            g = lambda i: None if i is None else i // self.group  # noqa: E731
            for name in _PER_GROUP_K:
                setattr(self, name, _slice(getattr(self, name), g(start), g(stop)))
        else:
            self.k_codes = _slice(self.k_codes, start, stop)

    def _slice_residual(self, start: int | None, stop: int | None) -> None:
        for name in _RESIDUAL:
            setattr(self, name, _slice(getattr(self, name), start, stop))

    def _drop_front(self, n: int) -> None:
        """Drop the ``n`` oldest tokens (in group mode only whole quantized groups, so groups stay
        aligned with the token stream: fewer may go); sinks go with their slots."""
        m = min(n, self.quantized_tokens)
        if self.group:
            m = m // self.group * self.group
        if m:
            self._slice_quantized(m, None)
            self.sink_k, self.sink_v = _slice(self.sink_k, m, None), _slice(self.sink_v, m, None)
            n -= m
        if n <= 0 or self.quantized_tokens or self.group:  # group mode: the residual is the next group
            return
        m = min(n, self.res_k.shape[2])
        if m:
            self._slice_residual(m, None)
            self.sink_k, self.sink_v = _slice(self.sink_k, m, None), _slice(self.sink_v, m, None)

    def _drop_back(self, n: int) -> None:
        """Drop the ``n`` newest tokens. Within the last update while past recording is on (the
        drafts assisted decoding rejects), the layer is put back as it was before that update
        and the kept tokens are appended again from their exact copies: the layer then equals
        one fed only the kept tokens. Otherwise, in group mode, the kept part of a split group goes back
        to the residual as the keys and values the cache served for it (dequantized, rotated at
        its positions; sinks as their exact copies; INT8 again with an ``int8`` tail): a group's
        codes cannot be re-encoded without its dropped tokens, and the exact originals are gone.

        ``_seen`` is lowered with each part removed, so that ``_seen − held_tokens`` stays the
        stream index of the first held token: the split group is read (and pre-RoPE keys
        rotated) at its own positions."""
        undo, self._undo = self._undo, None
        if undo is not None and 0 < n <= undo.tokens:
            undo.restore(self)
            kept = undo.tokens - n
            if kept:
                self._append(undo.k[:, :, :kept], undo.v[:, :, :kept],
                             None if undo.pos is None else undo.pos[:, :, :kept])
            self._undo = None  # what was cropped is gone
            return
        m = min(n, self.res_k.shape[2])
        if m:
            self._slice_residual(None, self.res_k.shape[2] - m)
            self._seen -= m
            n -= m
        have = self.quantized_tokens
        m = min(n, have)
        if m:
            keep = have - m
            partial = keep % self.group if self.group else 0
            if partial:
                k, v = self._dequantized()
                (ck, sk), (cv, sv) = (self._encode_tail(k[:, :, keep - partial : keep]),
                                      self._encode_tail(v[:, :, keep - partial : keep],
                                                        exact=not self.options.quantize_values))
                for name, t in zip(_RESIDUAL[:4], (ck, sk, cv, sv)):
                    if t is not None:
                        setattr(self, name, torch.cat([t, getattr(self, name)], dim=2))
                if self.res_pos is not None:
                    self.res_pos = torch.cat([self.k_pos[:, :, keep - partial : keep], self.res_pos], dim=2)
            self._slice_quantized(None, keep - partial)
            self._seen -= m
        self.sink_k, self.sink_v = _slice(self.sink_k, None, self.held_tokens), _slice(self.sink_v, None, self.held_tokens)

    def _keep_last(self, n: int) -> None:
        extra = self.held_tokens - max(n, 0)
        if extra > 0:
            self._drop_front(extra)

    # --- Cache-layer API --------------------------------------------------------------
    def activate_past_recording(self, **kwargs) -> None:
        """Keep what a crop of the last update needs to replay it exactly (transformers calls this
        before assisted decoding; sliding layers also keep past tokens until the crop). Keyword
        arguments (5.25+: ``recurrent_states_to_keep``) are for recurrent layers; an attention layer
        has no recurrent state, so they are accepted and unused, as transformers' own layers do."""
        self.record_past = True

    def reorder_cache(self, beam_idx: torch.LongTensor, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            idx = beam_idx.to(self.device)
            self._map(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            self._map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self, *args, **kwargs) -> None:
        self._clear()
        self._seen = 0
        self._dev_tables = None
        super().reset()
        self.is_initialized = False  # so the next update re-creates the storage (5.23+ base reset does; 5.17's does not)

    def offload(self, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None and self.k_codes.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    # --- memory -----------------------------------------------------------------------
    def _held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps between steps: its storage and the rotation plan of
        decoding from codes (whose δ tables the cache's layers share)."""
        undo = self._undo.tensors() if self._undo is not None else []
        return self._tensors() + (self._plan.tensors() if self._plan is not None else []) + undo

    def memory_bytes(self, seen: set | None = None) -> int:
        """Bytes of storage held by this layer's tensors, each storage counted once — and not at
        all if already in ``seen`` (the storages counted so far; updated)."""
        seen, total = set() if seen is None else seen, 0
        for t in self._held_tensors():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    def bytes_per_token(self) -> float:
        """:meth:`memory_bytes` per held token and batch row (0 when empty)."""
        n = self.held_tokens
        return self.memory_bytes() / (n * self.k_codes.shape[0]) if n else 0.0

    def quantized_bytes_per_token(self) -> float:
        """Bytes per token of the quantized segment: key codes (+ group mid/half / G) + value
        codes + value scale (or exact values), + the int32 position of pre-RoPE keys where positions
        are stored (not while they equal the stream index)."""
        h, d, o = self.tables.k_centers.shape[0], self.tables.k_offset.shape[-1], self.options
        if self.group:
            per_head = (self.packing.group_bytes / h + 2 * d * o.scale_bits / 8) / self.group
        else:
            per_head = packed_size(d, o.bits_k)
        if o.quantize_values:
            per_head += packed_size(d, o.bits_v) + _VALUE_SCALE_BYTES
        else:
            per_head += d * torch.finfo(getattr(self, "dtype", torch.float16)).bits // 8
        return h * per_head + (4 if self.k_pos is not None else 0)

    def fp16_bytes_per_token(self) -> int:
        """Bytes per token of the same layer's keys and values in fp16."""
        return 2 * self.tables.k_centers.shape[0] * self.tables.k_offset.shape[-1] * 2


class KVQuantLayer(_QuantKV, DynamicLayer):
    """Full-attention layer: holds every token ([sink | quantized | residual])."""

    def __init__(self, tables: LayerTables, options: CacheOptions, rope: LayerRope | None = None, **kwargs):
        DynamicLayer.__init__(self)
        self._setup(tables, options, options.sink, rope)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store(key_states, value_states)
        if self._deferrable():
            return self._defer(self.held_tokens)
        return self._materialize()

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """What :meth:`update` stores, without returning the held tokens (``positions`` (B, 1, n):
        the tokens' position ids for pre-RoPE keys, else the attention module's)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states, positions)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.held_tokens

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        """Remove ``-tokens_to_remove`` (a negative int) tokens from the end, as DynamicLayer."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized or self.k_codes is None:
            self._undo = None  # the update was kept: nothing to take back
            return
        self._drop_back(-tokens_to_remove)


class KVQuantSlidingLayer(_QuantKV, DynamicSlidingWindowLayer):
    """Sliding-window layer: keeps the last ``sliding_window − 1`` tokens (group mode: plus the
    rest of a partly expired group) and returns, like ``DynamicSlidingWindowLayer``, at most the
    last ``sliding_window − 1`` past tokens plus the new ones (past recording included)."""

    def __init__(self, sliding_window: int, tables: LayerTables, options: CacheOptions,
                 rope: LayerRope | None = None, **kwargs):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self._setup(tables, options, options.sink, rope)  # sinks stay exact while inside the window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        self._store(key_states, value_states)
        if self._deferrable():
            return self._defer(min(self.held_tokens, self.sliding_window - 1 + n))
        k, v = self._materialize()
        if not self.record_past:
            self._keep_last(self.sliding_window - 1)
        visible = self.sliding_window - 1 + n
        if k.shape[2] > visible:
            k, v = k[:, :, -visible:], v[:, :, -visible:]
        return k, v

    def _end_step(self) -> None:
        if not self.record_past:
            self._keep_last(self.sliding_window - 1)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[2]
        self._append(key_states, value_states, positions)

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """What :meth:`update` stores (expired tokens dropped), without returning the window."""
        self._store(key_states, value_states, positions)
        self._end_step()

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        if not self.is_initialized or self.k_codes is None:
            return
        if not tokens_to_remove:
            self._undo = None  # the update was kept: nothing to take back
        if self.get_seq_length() >= self.sliding_window:
            if not self.record_past:
                raise RuntimeError(
                    "`crop` was called, but the current layer does not track past states, and the sliding window "
                    "size was already reached. Call `activate_past_recording` before `crop` to be able to rollback."
                )
            if tokens_to_remove > 0:
                raise RuntimeError("once the sliding window is reached, crop only with a negative number of tokens")
            if tokens_to_remove < 0:
                self._drop_back(-tokens_to_remove)
                self.cumulative_length += tokens_to_remove
            self._keep_last(self.sliding_window - 1)
        else:
            if tokens_to_remove > 0:
                raise ValueError("crop with a negative number of tokens to remove")
            self._drop_back(-tokens_to_remove)
            self.cumulative_length = self.held_tokens


class KVQuantCache(Cache):
    """A transformers ``Cache`` of :class:`KVQuantLayer` / :class:`KVQuantSlidingLayer` (build it
    with :func:`make_cache`)."""

    def __init__(self, layers: list, options: CacheOptions):
        super().__init__(layers=layers)
        self.options = options

    def kvquant_begin_step(self, layer: int, q_len: int) -> "_QuantKV | None":
        """kvquant's attention pre-hook: the layer that will defer the coming step's attention
        to :meth:`_QuantKV.decode_attention` (one new token, a layout read from codes), or None."""
        target = self.layers[layer] if layer < len(self.layers) else None
        return target if isinstance(target, _QuantKV) and target.begin_step(q_len) else None

    def reads_codes(self) -> bool:
        """Whether decoding steps read attention from the codes (every quantized layer does)."""
        layers = self._quant_layers()
        return bool(layers) and all(layer.reads_codes for layer in layers)

    def _quant_layers(self) -> list[_QuantKV]:
        return [layer for layer in self.layers if isinstance(layer, _QuantKV)]

    def _layer_bytes(self) -> list[tuple[int, int]]:
        """``(bytes, batch × held tokens)`` per layer, a storage shared by layers counted with the first."""
        seen: set = set()
        return [(layer.memory_bytes(seen), layer.held_tokens * (layer.k_codes.shape[0] if layer.held_tokens else 0))
                for layer in self._quant_layers()]

    def memory_bytes(self) -> int:
        """Bytes held by all layers' tensors (codes, scales, exact sink/residual tokens, the
        rotation plans of decoding from codes), each storage counted once."""
        return sum(n for n, _ in self._layer_bytes())

    def bytes_per_token(self) -> float:
        """Bytes per token of context (all layers, per batch row): Σ over layers of the layer's
        held bytes / (batch × held tokens)."""
        return sum(n / t for n, t in self._layer_bytes() if t)

    def quantized_bytes_per_token(self) -> float:
        """Steady-state bytes per quantized token, all layers (codes + their scales)."""
        return sum(layer.quantized_bytes_per_token() for layer in self._quant_layers())

    def fp16_bytes_per_token(self) -> int:
        """Bytes per token of an fp16 KV cache of the same model (all layers)."""
        return sum(layer.fp16_bytes_per_token() for layer in self._quant_layers())

    def quantized_tokens(self) -> int:
        """Tokens held as codes by the layer that holds the most (a full-attention one)."""
        return max((layer.quantized_tokens for layer in self._quant_layers() if layer.is_initialized), default=0)

    def table_bytes(self) -> int:
        """Static tables (per model, not per token): key codebooks, offsets, scales, value codebook."""
        return sum(layer.tables.nbytes() for layer in self._quant_layers())


def _wrap_for_hooks(model: torch.nn.Module) -> None:
    """Wrap the model (mode ``off``: logits unchanged) if it is not wrapped, for kvquant's
    pre-hook (it passes position ids on and routes decoding steps to the codes)."""
    from kvquant.hf.wrap import is_wrapped, wrap

    if not is_wrapped(model):
        wrap(model, None)


def _layer_ropes(model: torch.nn.Module) -> dict[int, LayerRope]:
    """:class:`LayerRope` of every attention layer (wraps the model: :func:`_wrap_for_hooks`)."""
    from kvquant.hf.wrap import attention_modules, rotary_tables

    tables = rotary_tables(model)
    _wrap_for_hooks(model)
    shared: dict = {}
    return {m.layer_idx: LayerRope(m, tables, m.layer_idx, shared) for m in attention_modules(model)}


def make_cache(
    model: torch.nn.Module,
    codebooks: Codebooks,
    *,
    bits_v: int | None = None,
    quantize_values: bool = True,
    residual: int = 0,
    sink: int | None = None,
    values: str = "minmax",
    decode: str = "codes",
    kernel: str = "auto",
    tail: str = "int8",
) -> KVQuantCache:
    """A fresh :class:`KVQuantCache` for ``model`` with its calibrated ``codebooks``: keys at the
    codebooks' key bits (allocated per channel where the codebooks are) and normalisation, group
    scales in the codebooks' ``scale_bits``; values at ``bits_v`` (default: the codebooks'
    ``config.bits_v``, or where that is 0 the keys' mean code bits, rounded); ``sink``
    defaults to the codebooks' exact sink tokens. ``tail`` (:data:`TAIL_FORMATS`): how the newest
    incomplete group's keys and values are held until it is quantized — ``int8`` (default, chosen on
    development windows: eval/tail_format.py) or ``exact`` (the simulated path's rule). ``decode`` (:data:`DECODE_MODES`): ``codes``
    computes each decoding step's attention from the codes (channel-group keys, quantized values,
    CPU; the model is wrapped, mode ``off``, for the hook that routes the step), ``dequantize``
    dequantizes every held token first (the reference). ``kernel``
    (:data:`kvquant.kernels.dispatch.DECODE_KERNELS`): which kernel reads the steps — ``auto``, the
    device's (C on the CPU, Triton on CUDA; where it cannot run, a warning and steps dequantize),
    ``c`` or ``triton`` (ValueError where it cannot run). Pass it to ``model.generate(...,
    **cache_kwargs(cache))`` or ``model(..., **cache_kwargs(cache))`` (``cache=`` from transformers 5.24,
    ``past_key_values=`` before); one cache per generation. TypeError if ``codebooks`` is not a
    :class:`~kvquant.codebooks.Codebooks` (a file path: load it with ``Codebooks.load(path)``)."""
    if not isinstance(codebooks, Codebooks):
        import os

        given = f" {os.fspath(codebooks)!r}" if isinstance(codebooks, (str, os.PathLike)) else ""
        raise TypeError(
            f"make_cache(model, codebooks): codebooks must be a kvquant.Codebooks, got "
            f"{type(codebooks).__name__}{given}; load a codebook file with Codebooks.load(path)"
        )
    codebooks.check_fits(model)
    k = codebooks.k
    if k.token_scale:
        raise NotImplementedError(
            "these codebooks scale each key token (norm 'channel-token'), which KVQuantCache does not store: use "
            "a channel-group file for the cache (kvquant calibrate's default), and channel-token for queries "
            "(Codebooks.causal_queries)"
        )
    if k.outliers:
        raise NotImplementedError(
            f"these codebooks keep {k.outliers:g} of the key entries exact (dense-and-sparse outliers); "
            "KVQuantCache stores dense codes only: calibrate with outliers=0 for the cache"
        )
    if bits_v is None:
        bits_v = codebooks.config.bits_v or round(k.mean_bits)
    if decode == "codes" and k.group and quantize_values:  # a layout decoding steps read from the codes
        device = next(model.parameters()).device
        fn, why = step_kernel(kernel, torch.device("cpu") if device.type == "meta" else device, k.group)
        if fn is None and kernel != "auto":
            raise ValueError(f"make_cache(kernel={kernel!r}) cannot run here: {why}")
        if fn is None:
            warnings.warn(f"decoding by dequantizing every held token (slower): {why}", stacklevel=2)
            decode = "dequantize"
    options = CacheOptions(
        k.bits, bits_v, quantize_values, residual,
        k.sink if sink is None else sink, k.group, k.scale_bits, values, decode, kernel, tail,
    )
    config = model.config.get_text_config(decoder=True)
    layer_types = cache_layer_types(config)
    if len(layer_types) != k.centers.shape[0]:
        raise ValueError(f"model has {len(layer_types)} layers, codebooks {k.centers.shape[0]}")
    ropes = _layer_ropes(model) if codebooks.config.rope == "pre" else {}
    if decode == "codes" and not ropes:
        _wrap_for_hooks(model)
    layers = []
    for i, (kind, window) in enumerate(layer_types):
        if kind == "dummy":
            layers.append(DummyLayer())
            continue
        tables = LayerTables.from_codebooks(codebooks, i, options)
        if kind == "full_attention":
            layers.append(KVQuantLayer(tables, options, ropes.get(i)))
        elif kind in WINDOWED_LAYER_TYPES:
            layers.append(KVQuantSlidingLayer(window, tables, options, ropes.get(i)))
        else:
            raise NotImplementedError(f"layer {i} has type {kind!r}; KVQuantCache supports full and sliding attention")
    return KVQuantCache(layers, options)


class QueryQuantizer:
    """A quantizer for :func:`kvquant.wrap` that quantizes queries only (``sides = ("q",)``) and
    passes keys through: use it beside a :class:`KVQuantCache`, which already holds quantized keys.

    Only causal query codebooks are accepted — a query is quantized from its own token and static
    calibrated tables (``norm`` ``head``/``channel``/``channel-token``), so a decoding step and a prefill give it
    the same codes; group-normalised query books (their range spans up to G − 1 later queries)
    are refused: :meth:`Codebooks.causal_queries` builds static per-channel ones from the same
    statistics. Pre-RoPE books get the queries with the rotation undone (the attention function
    derotates queries only). Queries at positions below the codebooks' ``sink`` stay exact: the
    positions are the ``position_ids`` the attention module was called with (stashed by
    :func:`kvquant.wrap`'s pre-hook), so a decoding step's single query is not taken for a sink.
    """

    sides = ("q",)

    def __init__(self, codebooks: Codebooks, model: torch.nn.Module):
        from kvquant.hf.wrap import attention_modules

        if codebooks.q.group:
            raise ValueError(
                "these query codebooks normalise over groups of tokens, which a decoding step does not have "
                "(the group's range spans later queries): use codebooks.causal_queries() for static per-channel tables"
            )
        self.codebooks, self.rope, self.sink = codebooks, codebooks.config.rope, codebooks.q.sink
        self._modules = {m.layer_idx: m for m in attention_modules(model)}
        self._no_sink = replace(codebooks.q, sink=0)

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        if side != "q":
            return x
        out = self._no_sink.apply(x, layer)
        if not self.sink:
            return out
        pos = getattr(self._modules[layer], "kvquant_positions", None)
        if pos is None or pos.shape[-1] != x.shape[2]:
            raise RuntimeError(f"layer {layer}: no position_ids for the {x.shape[2]} queries (is the model wrapped?)")
        exact = (pos < self.sink).expand(x.shape[0], -1)[:, None, :, None].to(x.device)
        return torch.where(exact, x, out)

    def effective_bits(self, head_dim: int | None = None, *args, **kwargs) -> float:
        """Bits per query entry: codes, and a ``channel-token`` scale (16 / head_dim; static tables
        add nothing per entry; sinks not counted)."""
        token = 16 / (head_dim or self.codebooks.fingerprint.head_dim) if self.codebooks.q.token_scale else 0.0
        return float(self.codebooks.q.mean_bits) + token


def query_quantizer(codebooks: Codebooks, model: torch.nn.Module) -> QueryQuantizer:
    """:class:`QueryQuantizer` of ``codebooks``: ``kvquant.wrap(model, query_quantizer(books, model))``."""
    return QueryQuantizer(codebooks, model)
