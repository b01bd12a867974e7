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

**Values** (quantized with the keys, when their group completes). ``values="minmax"``: per token
and KV head, ``mid``/``half`` of the values over head_dim stored as 8-bit codes, ``(v − mid)/half``
on 2^bits_v evenly spaced levels including ±1 — asymmetric INT per token (KIVI's values), through
:func:`kvquant.core.quantizer.encode_groups` along head_dim. ``values="hadamard"`` (the default where
head_dim is a power of two): the same codes of the row rotated first, ``v H`` with H the orthonormal
Hadamard matrix, read back as ``v̂' H`` (H is symmetric) — a few large channels no longer set the
step of all the others (KLD −8% at the default split, −24% with 3-bit and −39% with 2-bit values on
SmolLM2's development windows: eval/research/value_hadamard_cache.py); the kernels sum the coded
tokens' values apart and rotate that sum back once per step. ``values="rms"``: ``r =
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
placeholders, and the attention function calls :meth:`~kvquant.cache.steps.CodeSteps.decode_attention`, which reads
the codes (:func:`kvquant.kernels.dispatch.attend`) — no held token is dequantized. Prefill and
other layouts dequantize (``_materialize``), as ``decode="dequantize"`` does every step.

Memory: :meth:`KVQuantCache.memory_bytes` sums the storage of every tensor the layers hold
(key codes, group mid/half, value codes and scales, exact sink/residual tokens, stored positions,
the rotation tables decoding from codes keeps), each storage once; the static tables (centers,
boundaries, offsets, scales; :meth:`KVQuantCache.table_bytes`) are per model. :func:`kv_bytes_per_token`
gives the same bytes per token on paper, for any model geometry and sequence length (docs/serving.md).
"""

from kvquant.cache.factory import make_cache
from kvquant.cache.format import (
    DECODE_MODES,
    SCALE_DTYPE,
    TAIL_FORMATS,
    VALUE_NORMS,
    default_values,
    CacheOptions,
    LayerTables,
    kv_bytes_per_token,
    value_codebook,
)
from kvquant.cache.layers import KVQuantCache, KVQuantLayer, KVQuantSlidingLayer
from kvquant.cache.positions import LayerRope
from kvquant.cache.queries import QueryQuantizer, query_quantizer

__all__ = [
    "DECODE_MODES",
    "SCALE_DTYPE",
    "TAIL_FORMATS",
    "VALUE_NORMS",
    "default_values",
    "CacheOptions",
    "KVQuantCache",
    "KVQuantLayer",
    "KVQuantSlidingLayer",
    "LayerRope",
    "LayerTables",
    "QueryQuantizer",
    "kv_bytes_per_token",
    "make_cache",
    "query_quantizer",
    "value_codebook",
]
