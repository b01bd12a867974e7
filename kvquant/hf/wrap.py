"""Wrap a Hugging Face causal LM so that its attention runs through kvquant, and unwrap it.

``wrap`` selects the ``"kvquant"`` attention implementation (registered with
``transformers.AttentionInterface``) and attaches one :class:`~kvquant.hf.attention.Controller`
to every attention module; no modeling code is patched. ``unwrap`` restores the previous
implementation exactly.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from kvquant.codebooks import Codebooks
from kvquant.hf.attention import ATTN_NAME, Controller, Quantizer, register, stash_rotary
from kvquant.hf.prefill import check_prefill
from kvquant.io.fingerprint import SUPPORTED, UnsupportedModelError

_ORIGINAL = "_kvquant_original_attn"


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a decoder: modules named ``*Attention`` that carry ``layer_idx``."""
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return mods


def controller(model: torch.nn.Module) -> Controller:
    """The controller of a wrapped model (raises if the model is not wrapped)."""
    mods = attention_modules(model)
    ctl = getattr(mods[0], "kvquant", None) if mods else None
    if ctl is None:
        raise ValueError("model is not wrapped; call kvquant.wrap(model, ...) first")
    return ctl


def is_wrapped(model: torch.nn.Module) -> bool:
    return hasattr(model, _ORIGINAL)


def wrap(model: torch.nn.Module, codebooks: Codebooks | Quantizer | None = None, *,
         prefill: str | None = None) -> torch.nn.Module:
    """Route ``model``'s attention through kvquant; returns the same model object.

    ``codebooks``: a :class:`Codebooks` (checked against the model: layers, heads, head_dim,
    architecture), any quantizer ``f(x, layer, side)`` such as a :class:`~kvquant.evaluation.baselines.Baseline`
    (its attribute ``rope``, ``"post"`` if absent, says whether it quantizes post- or pre-RoPE
    entries; see :mod:`kvquant.hf.attention`), or None (mode ``off``: logits identical to the
    ``sdpa`` implementation). With a quantizer the mode is ``quantize``. Wrapping a wrapped model replaces its quantizer.

    ``prefill``: ``"int8"`` runs the prefills of an unquantized model (mode ``off``, a KV cache's
    prompt included) with ``Q·Kᵀ`` from INT8 codes on the CPU (:mod:`kvquant.hf.prefill`);
    ``"sdpa"`` with transformers' SDPA; None keeps the model's setting (``"sdpa"`` when first wrapped).
    """
    if prefill is not None:
        check_prefill(prefill)
    if isinstance(codebooks, Codebooks):
        codebooks.check_fits(model)
    elif codebooks is not None and not callable(codebooks):
        raise TypeError(
            f"wrap(model, codebooks): codebooks must be a kvquant.Codebooks (Codebooks.load(path)), a quantizer "
            f"f(x, layer, side) or None, got {type(codebooks).__name__}"
        )
    if is_wrapped(model):
        ctl = controller(model)
    else:
        mods = attention_modules(model)
        if not mods:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no attention modules with a layer_idx were found; kvquant supports "
                f"decoder models whose attention routes through transformers.AttentionInterface ({SUPPORTED})"
            )
        register()
        original = model.config._attn_implementation
        try:
            model.set_attn_implementation(ATTN_NAME)
        except (ValueError, NotImplementedError) as e:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not accept a custom attention function ({e}); "
                "kvquant needs a model class with AttentionInterface support"
            ) from e
        ctl = Controller()
        for m in mods:
            m.kvquant = ctl
            m.kvquant_hook = m.register_forward_pre_hook(stash_rotary, with_kwargs=True)
        setattr(model, _ORIGINAL, original)
    ctl.quantizer = codebooks
    ctl.rope = getattr(codebooks, "rope", "post")
    if prefill is not None:
        ctl.prefill = prefill
    ctl.set_mode("quantize" if codebooks is not None else "off")
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`wrap`: the previous attention implementation, no controllers left behind."""
    if not is_wrapped(model):
        return model
    for m in attention_modules(model):
        if hasattr(m, "kvquant"):
            m.kvquant_hook.remove()
            del m.kvquant, m.kvquant_hook
        for name in ("kvquant_rotary", "kvquant_positions", "kvquant_cache_layer"):
            if hasattr(m, name):
                delattr(m, name)
    model.set_attn_implementation(getattr(model, _ORIGINAL))
    delattr(model, _ORIGINAL)
    return model


def rotary_tables(model: torch.nn.Module) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``tables(layer, position_ids)`` → the ``(cos, sin)`` (B, n, r) float32 that ``model``'s
    rotary embedding gives layer ``layer`` at ``position_ids`` (B, n) — the model's own module
    (its rope type and scaling; Gemma3's per-layer-type rope through its ``layer_type`` argument);
    ``tables.frequencies(layer)`` → the module's ``(inv_freq, attention_scaling)`` for the layer.
    UnsupportedModelError if the model has no (or more than one) rotary embedding module."""
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotary) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(rotary)} rotary embedding modules; pre-RoPE keys in the KV cache need "
            "exactly one (Llama, Qwen2, Mistral, Gemma3, GPT-NeoX): calibrate with rope='post'"
        )
    rot = rotary[0]
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    by_type = "layer_type" in inspect.signature(rot.forward).parameters

    def tables(layer: int, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        with torch.no_grad():
            return rot(x, position_ids, layer_types[layer]) if by_type else rot(x, position_ids)

    def frequencies(layer: int) -> tuple[torch.Tensor, float]:
        """``(inv_freq (r/2,), attention_scaling)`` the tables of ``layer`` are computed from."""
        prefix = f"{layer_types[layer]}_" if by_type else ""
        return getattr(rot, f"{prefix}inv_freq"), float(getattr(rot, f"{prefix}attention_scaling"))

    tables.frequencies = frequencies
    return tables


@contextmanager
def wrapped(model: torch.nn.Module, codebooks: Codebooks | Quantizer | None = None) -> Iterator[torch.nn.Module]:
    """``with kvquant.wrapped(model, codebooks):`` — wrapped inside, restored on exit.

    If the model was already wrapped, its previous quantizer and mode come back on exit.
    """
    was = is_wrapped(model)
    ctl = controller(model) if was else None
    prev = (ctl.quantizer, ctl.mode, ctl.rope) if was else None
    wrap(model, codebooks)
    try:
        yield model
    finally:
        if was:
            ctl.quantizer, ctl.mode, ctl.rope = prev
        else:
            unwrap(model)
