"""Building a :class:`~kvquant.cache.layers.KVQuantCache` for a model and its codebooks."""

from __future__ import annotations

import warnings

import torch

from kvquant.cache.format import CacheOptions, LayerTables, default_values
from kvquant.cache.layers import KVQuantCache, KVQuantLayer, KVQuantSlidingLayer
from kvquant.cache.positions import LayerRope
from kvquant.codebooks import Codebooks
from kvquant.hf.compat import WINDOWED_LAYER_TYPES, DummyLayer, cache_layer_types
from kvquant.hf.wrap import attention_modules, is_wrapped, rotary_tables, wrap
from kvquant.kernels.dispatch import step_kernel


def _wrap_for_hooks(model: torch.nn.Module) -> None:
    """Wrap the model (mode ``off``: logits unchanged) if it is not wrapped, for kvquant's
    pre-hook (it passes position ids on and routes decoding steps to the codes)."""
    if not is_wrapped(model):
        wrap(model, None)


def _layer_ropes(model: torch.nn.Module) -> dict[int, LayerRope]:
    """:class:`LayerRope` of every attention layer (wraps the model: :func:`_wrap_for_hooks`)."""
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
    values: str | None = None,
    decode: str = CacheOptions.decode,
    kernel: str = CacheOptions.kernel,
    tail: str = CacheOptions.tail,
) -> KVQuantCache:
    """A fresh :class:`KVQuantCache` for ``model`` with its calibrated ``codebooks``: keys at the
    codebooks' key bits (allocated per channel where the codebooks are) and normalisation, group
    scales in the codebooks' ``scale_bits``; values at ``bits_v`` (default: the codebooks'
    ``config.bits_v``, or where that is 0 the keys' mean code bits, rounded); ``sink``
    defaults to the codebooks' exact sink tokens. ``values`` (:data:`VALUE_NORMS`): how each value row
    is normalised before its codes — default ``hadamard`` (min–max INT of the row rotated by a Hadamard
    matrix) where head_dim is a power of two, else ``minmax``. ``tail`` (:data:`TAIL_FORMATS`): how the newest
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
    head_dim = k.centers.shape[2]
    values = default_values(head_dim) if values is None else values
    if values == "hadamard" and head_dim & (head_dim - 1):
        raise ValueError(f"values='hadamard' rotates head_dim by a Hadamard matrix, which needs a power of two; "
                         f"this model's head_dim is {head_dim}: use values='minmax'")
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
