"""kvquant's attention function, registered with ``transformers.AttentionInterface``.

One function serves every model family that routes attention through the interface (Llama,
Qwen2, Mistral, Gemma3, GPT-2, GPT-NeoX, …). It receives post-RoPE ``query`` (B, H, T, D) and
``key``/``value`` (B, H_kv, S, D) — keys not repeated for GQA, cached past tokens included —
and, depending on the :class:`Controller` attached to the attention module by ``wrap``:

``off``       calls transformers' SDPA attention unchanged (bit-identical logits to ``sdpa``) — or,
              with ``Controller.prefill == "int8"``, runs prefills from INT8 codes
              (:mod:`kvquant.hf.prefill`);
``capture``   hands q, k and the mask of allowed (query, key) pairs to an observer
              (e.g. :meth:`kvquant.core.stats.PairStats.update`), then attends unchanged; in a
              forward that records gradients, a ``grad_observer`` also gets ∂loss/∂q and
              ∂loss/∂k during backward (Fisher weights, :meth:`GroupHistogram.update_grad`);
``quantize``  replaces q and k by their quantized values, then attends with SDPA — or, for a
              quantizer whose keys use causal groups (``key_group`` G > 0), reads each key
              quantized only from the query that completes its group on, exactly what
              decoding through :class:`kvquant.cache.KVQuantCache` reads
              (:func:`block_causal_attention`).

A mask function is registered under the same name (transformers' ``sdpa_mask``); without it
every call would receive ``attention_mask=None`` and padding and sliding windows would be lost.

Frame: with ``Controller.rope == "pre"`` the observer and the quantizer see q and k with the
rotary embedding undone (:mod:`kvquant.core.rope`; the tables are the ``position_embeddings`` the
attention module was called with, stashed by a forward pre-hook that ``wrap`` installs), and
quantized entries are rotated back. Keys then must be those of the same positions as the
queries (a forward pass without a cache); keys of earlier positions from a cache raise, unless
the quantizer quantizes queries only (``sides = ("q",)``, :class:`kvquant.cache.QueryQuantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvquant.core.rope import Rope, derotate, pullback, rotate
from kvquant.hf.compat import passed_cache
from kvquant.hf.prefill import int8_prefill

ATTN_NAME = "kvquant"
Mode = Literal["off", "capture", "quantize"]
#: ``quantizer(x, layer, side)`` returns dequantized ``x`` (same shape/dtype); side is "q" or "k".
#: A quantizer with ``sides = ("q",)`` quantizes queries only (keys come quantized from a KV cache);
#: one with ``sides = ("k",)`` keys only (queries exact, e.g. :class:`kvquant.evaluation.diagnostics.KeysOnly`).
Quantizer = Callable[[torch.Tensor, int, str], torch.Tensor]
#: ``observer(layer, q, k, pair_mask)`` with pair_mask bool (B|1, 1, T, S), True = attends.
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
#: ``grad_observer(layer, side, x, grad)``: entries x (q or k, in the controller's frame) and the
#: gradient of the loss with respect to them, called during backward of a capture-mode forward.
GradObserver = Callable[[int, str, torch.Tensor, torch.Tensor], None]


@dataclass
class Controller:
    """What the attention function does; one per wrapped model, shared by its layers."""

    mode: Mode = "off"
    quantizer: Quantizer | None = None
    observer: Observer | None = None
    grad_observer: GradObserver | None = None  # capture mode, when the forward records gradients
    calls: set[int] = field(default_factory=set)  # layers that ran through this function
    rope: Rope = "post"  # frame in which the observer / quantizer see q and k
    prefill: str = "sdpa"  # "int8": prefills of unquantized entries from INT8 codes (kvquant.hf.prefill)
    prefill_warned: bool = False

    def set_mode(self, mode: Mode) -> None:
        if mode not in ("off", "capture", "quantize"):
            raise ValueError(f"mode must be 'off', 'capture' or 'quantize', got {mode!r}")
        if mode == "quantize" and self.quantizer is None:
            raise ValueError("quantize mode needs a quantizer (codebooks or a baseline)")
        if mode == "capture" and self.observer is None:
            raise ValueError("capture mode needs an observer (e.g. PairStats.update)")
        self.mode = mode


def pair_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, is_causal: bool, device) -> torch.Tensor:
    """Boolean (B|1, 1, T, S) mask of the allowed pairs.

    ``attention_mask`` from ``sdpa_mask`` is already that (True = attend) or ``None`` when it
    could be skipped: then the pattern is causal, aligned so that the last query sees every key.
    """
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"kvquant expects boolean SDPA masks, got {attention_mask.dtype}")
        return attention_mask
    if not is_causal or q_len == 1:
        return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    t = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    s = torch.arange(kv_len, device=device)[None, :]
    return (s <= t)[None, None]


def kvquant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with transformers' exact signature; see the module docstring for modes."""
    ctl: Controller | None = getattr(module, "kvquant", None)
    if ctl is None:
        raise RuntimeError(
            f"{type(module).__name__} runs kvquant attention but is not wrapped; "
            "use kvquant.wrap(model, ...) rather than selecting attn_implementation='kvquant' by hand"
        )
    layer = module.layer_idx
    ctl.calls.add(layer)
    if ctl.mode == "off":
        if ctl.prefill == "int8":
            done = int8_prefill(module, query, key, value, attention_mask, **kwargs)
            if done is not None:
                return done
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    if ctl.mode == "capture":
        tables = _rotary_tables(module, query, key) if ctl.rope == "pre" else None
        q_in, k_in = (query, key) if tables is None else (derotate(query, *tables), derotate(key, *tables))
        mask = pair_mask(attention_mask, query.shape[2], key.shape[2], getattr(module, "is_causal", True), query.device)
        ctl.observer(layer, q_in, k_in, mask)
        if ctl.grad_observer is not None and query.requires_grad:
            _observe_grads(ctl.grad_observer, layer, (("q", query, q_in), ("k", key, k_in)), tables)
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    q_hat, k_hat = quantize_qk(module, ctl.quantizer, ctl.rope, query, key)
    group = key_group(ctl.quantizer)
    if group and key.shape[2] == query.shape[2]:
        return block_causal_attention(q_hat, k_hat, key, value, attention_mask, group, **kwargs)
    return _sdpa(module, q_hat, k_hat, value, attention_mask, **kwargs)


def quantize_qk(module: torch.nn.Module, quantizer: Quantizer, rope: Rope, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q̂, k̂)`` post-RoPE, as quantize mode hands them to attention: ``quantizer`` applied to the
    post-RoPE ``query`` (B, H, T, D) and ``key`` (B, H_kv, S, D) of one call of ``module``, or
    (``rope="pre"``) to them with the rotary embedding undone — the tables ``module`` was called
    with, stashed by ``wrap``'s pre-hook — and rotated back. A side missing from the quantizer's
    ``sides`` (default ``("q", "k")``; ``("q",)`` beside a KV cache, whose keys come quantized)
    is returned as given, without the round trip through the rotation."""
    layer, sides = module.layer_idx, getattr(quantizer, "sides", ("q", "k"))
    keys = "k" in sides
    tables = _rotary_tables(module, query, key, keys) if rope == "pre" else None
    q_hat, k_hat = query, key
    if "q" in sides:
        q_hat = quantizer(query if tables is None else derotate(query, *tables), layer, "q")
        q_hat = q_hat if tables is None else rotate(q_hat, *tables).to(query.dtype)
    if keys:
        k_hat = quantizer(key if tables is None else derotate(key, *tables), layer, "k")
        k_hat = k_hat if tables is None else rotate(k_hat, *tables).to(key.dtype)
    return q_hat, k_hat


def key_group(quantizer: Quantizer) -> int:
    """G of a quantizer whose keys use causal groups (``key_group``; 0: none, or keys not quantized)."""
    return getattr(quantizer, "key_group", 0) if "k" in getattr(quantizer, "sides", ("q", "k")) else 0


def keys_read_quantized(t: int, group: int, device=None) -> torch.Tensor:
    """(T, T) bool: query t reads key s quantized iff s lies in a group of ``group`` tokens aligned at
    token 0 that is complete once token t is in, ``s < G·⌊(t+1)/G⌋`` (the newest incomplete group
    is read exact) — what a KV cache with causal groups serves (:func:`block_causal_attention`)."""
    pos = torch.arange(t, device=device)
    return pos[None, :] < ((pos[:, None] + 1) // group * group)


def block_causal_attention(query: torch.Tensor, key_q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, group: int, scaling: float | None = None,
                           softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one forward pass as a KV cache with causal groups serves it token by token:
    query t reads key s quantized (``key_q``) iff s lies in a group of ``group`` tokens, aligned
    at token 0, complete once token t is in — ``s < G·⌊(t+1)/G⌋`` — else exact (``key``; the
    newest incomplete group). Scores in float32; query (B, H, T, D), keys and value (B, H_kv, T, D)
    of the same T positions; ``attention_mask`` as transformers' SDPA mask (bool, True = attend)
    or None (causal). Returns ``(B, T, H, D)`` like ``sdpa_attention_forward``; no dropout (an
    evaluation path). Used when the quantizer has ``key_group > 0``
    (:attr:`kvquant.codebooks.Codebooks.key_group`)."""
    b, h, t, d = query.shape
    rep = h // key.shape[1]
    kq, ke, v = (x.repeat_interleave(rep, 1) if rep > 1 else x for x in (key_q, key, value))
    scale = scaling if scaling is not None else d**-0.5
    qf = query.float()
    s_q, s_e = (qf @ kq.float().transpose(-1, -2)) * scale, (qf @ ke.float().transpose(-1, -2)) * scale
    scores = torch.where(keys_read_quantized(t, group, query.device), s_q, s_e)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = pair_mask(attention_mask, t, t, True, query.device)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    out = probs @ v.float()
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def _observe_grads(observer: GradObserver, layer: int, sides, tables) -> None:
    """Hooks handing ``∂loss/∂x`` to ``observer`` in the frame of x (pre-RoPE: pulled back through
    the rotation, :func:`kvquant.core.rope.pullback`) when backward reaches the attention inputs."""
    for side, t, x in sides:
        def hook(g: torch.Tensor, side: str = side, x: torch.Tensor = x.detach()) -> None:
            observer(layer, side, x, g if tables is None else pullback(g, *tables))

        t.register_hook(hook)


def stash_rotary(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: keep the ``position_embeddings`` (cos, sin) and ``position_ids`` an
    attention module is called with (the KV cache reads the positions of pre-RoPE keys there),
    and tell a :class:`kvquant.cache.KVQuantCache` that a decoding step is coming: when its
    layer reads the step from the codes, the attention function hands the step to it."""
    module.kvquant_rotary = kwargs.get("position_embeddings")
    module.kvquant_positions = kwargs.get("position_ids")
    module.kvquant_cache_layer = None
    begin = getattr(passed_cache(kwargs), "kvquant_begin_step", None)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if begin is not None and hidden is not None and not module.training and _keys_as_given(module.kvquant):
        module.kvquant_cache_layer = begin(module.layer_idx, hidden.shape[1])


def _keys_as_given(ctl: Controller) -> bool:
    """Whether the attention function attends to the keys and values as the cache gives them."""
    return ctl.mode == "off" or (ctl.mode == "quantize" and getattr(ctl.quantizer, "sides", ("q", "k")) == ("q",))


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention — or, for a step a KV cache layer deferred (see
    :func:`stash_rotary`), that layer's attention from its codes (key and value are placeholders)."""
    layer = getattr(module, "kvquant_cache_layer", None)
    if layer is not None and layer.step_pending is not None:
        return layer.decode_attention(query, attention_mask, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _rotary_tables(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, keys: bool = True):
    tables = getattr(module, "kvquant_rotary", None)
    if tables is None:
        raise ValueError(
            f"{type(module).__name__} received no rotary position embeddings: pre-RoPE quantization needs a "
            "rotary model (Llama, Qwen2, Mistral, Gemma3, GPT-NeoX, …); use rope='post'"
        )
    if keys and key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            f"pre-RoPE quantization sees {key.shape[2]} keys for {query.shape[2]} queries: keys of earlier "
            "positions (a KV cache) cannot be derotated here; run without a cache (use_cache=False) or use rope='post'"
        )
    return tables


def register() -> None:
    """Register the attention and mask functions under ``"kvquant"`` (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvquant_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
