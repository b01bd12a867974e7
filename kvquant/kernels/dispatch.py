"""One decode step of attention read from a :class:`kvquant.cache.KVQuantCache` layer's codes.

For a single new query token per row, ``softmax(q·Kᵀ·scaling + mask)·V`` over the layer's held
tokens ``[quantized | exact residual]`` (the exact sinks laid over their code slots), in one call
of :func:`kvquant.kernels.cpu.decode_step`: the quantized keys' scores from the group records
(pre-RoPE keys rotated at their positions as ``R(p₀)·R(δ)``, :class:`RotationPlan`), the exact
tokens', the mask, the softmax, and the values from their codes — no key or value is written out
in full precision.

The reference is the dequantize-then-SDPA path (the layer's ``_materialize`` and transformers'
SDPA): same codes, outputs equal within float rounding (tests/test_code_attention.py).

:func:`step_kernel` is the one place that chooses which kernel reads a step: this C one on the
CPU, :func:`kvquant.kernels.triton_decode.decode_step` on a GPU (the same arguments and result).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvquant.kernels import cpu as cpu_kernels

__all__ = ["DECODE_KERNELS", "RotationPlan", "attend", "step_kernel"]

#: Which kernel computes a decoding step from the codes: ``auto`` — the device's (the C kernel on
#: the CPU, Triton on CUDA); ``c``; ``triton`` (on the CPU only under ``TRITON_INTERPRET=1``: tests).
DECODE_KERNELS = ("auto", "c", "triton")

StepKernel = Callable[..., torch.Tensor]  # (layer, query, attention_mask, scaling, start) -> (B, 1, H_q, D)


def step_kernel(kernel: str, device: torch.device, group: int) -> tuple[StepKernel | None, str]:
    """``(function, "")`` computing a decoding step from the codes of layers on ``device`` with
    key groups of ``group`` tokens — :func:`attend` or :func:`kvquant.kernels.triton_decode.decode_step` —
    or ``(None, why)`` where the chosen kernel cannot run (the cache then dequantizes)."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(DECODE_KERNELS)}, got {kernel!r}")
    device = torch.device(device)
    if kernel == "auto":
        kernel = "c" if device.type == "cpu" else "triton"
    if kernel == "c":
        if device.type != "cpu":
            return None, f"the C decode kernel runs on the CPU; the cache is on {device}"
        ok, why = cpu_kernels.available()
        return (attend, "") if ok else (None, why)
    from kvquant.kernels import triton_decode

    ok, why = triton_decode.available()
    if not ok:
        return None, why
    if group % 16:
        return None, f"the Triton decode kernel reads key groups of a multiple of 16 tokens, these have {group}"
    return functools.partial(triton_decode.decode_step, block_t=32 if group % 32 == 0 else 16), ""


@dataclass
class RotationPlan:
    """What the kernel needs to rotate one layer's quantized keys, rebuilt when the held groups change.

    ``base`` (B, m) int64: each group's base position p₀; ``base_cos``/``base_sin`` (B, m, r/2)
    float32: ``cos(θ p₀)``, ``sin(θ p₀)`` — the model's tables divided by the rotary scaling ``a``
    (the δ tables carry it) — one copy for the cache's layers whose groups lie at the same stream
    positions (:meth:`kvquant.cache.LayerRope.latest`), so ~4 bytes per token for the whole cache
    rather than per layer; ``cosd``/``sind`` (r/2, Δ): the model's ``a·cos(θ δ)``, ``a·sin(θ δ)``,
    one copy per cache (:meth:`kvquant.cache.LayerRope.delta_tables`); ``delta`` (B, S) int32
    rows into them, or None when positions are the stream (δ = token index mod G); all None for
    keys stored after the rotation. ``key`` identifies the held state it was built for."""

    key: tuple
    base: torch.Tensor | None
    base_cos: torch.Tensor | None
    base_sin: torch.Tensor | None
    cosd: torch.Tensor | None
    sind: torch.Tensor | None
    delta: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.base, self.base_cos, self.base_sin, self.cosd, self.sind, self.delta) if t is not None]

    @classmethod
    def build(cls, layer, key: tuple) -> "RotationPlan":
        """The plan for ``layer``'s quantized tokens (pre-RoPE keys: ``layer.rope`` set)."""
        g, b, sq = layer.group, layer.k_codes.shape[0], layer.quantized_tokens
        if layer.rope is None:
            return cls(key, None, None, None, None, None, None)

        def positions() -> torch.Tensor:  # (B, m, G)
            return layer._quantized_positions().long().view(b, sq // g, g)

        def bases(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            base = grouped.amin(-1).contiguous()  # (B, m)
            cos_b, sin_b = layer.rope.tables(base)
            inv_freq, a = layer.rope.frequencies()
            rh = inv_freq.shape[0]
            return base, (cos_b[..., :rh] / a).contiguous(), (sin_b[..., :rh] / a).contiguous()

        if layer.k_pos is None:  # stream positions: the key fixes every base, so layers at one key share them
            base, base_cos, base_sin = layer.rope.latest("group bases", key, lambda: bases(positions()))
            return cls(key, base, base_cos, base_sin, *layer.rope.delta_tables(g), None)  # δ = index mod G
        grouped = positions()
        base, base_cos, base_sin = bases(grouped)
        span = int((grouped.amax(-1) - base).max()) + 1 if sq else 1
        cos_d, sin_d = layer.rope.delta_tables(max(span, 1))  # (r/2, Δ), a included
        delta = (grouped - base.unsqueeze(-1)).reshape(b, sq).to(torch.int32).contiguous()
        return cls(key, base, base_cos, base_sin, cos_d, sin_d, delta)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _held(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Exact rows (sinks, the residual) as the kernel reads them: INT8 codes as held (``scale``: their
    fp16 scales), else in ``dtype`` (the query's: as held, no copy, in a model's own dtype)."""
    return x.contiguous() if scale is not None else x.to(dtype).contiguous()


def attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
           start: int) -> torch.Tensor:
    """Attention output (B, 1, H_q, D) in ``query``'s dtype — transformers' SDPA output layout —
    of one query token per row (``query`` (B, H_q, 1, D), post-RoPE) over ``layer``'s held tokens
    from ``start`` on (a sliding window's first visible token). ``attention_mask``: None or bool
    (B|1, 1, 1, S − start), True = attend."""
    b, hq, tq, d = query.shape
    h, o = layer.tables.k_centers.shape[0], layer.options
    if tq != 1 or hq % h:
        raise ValueError(f"attend takes one query token and a multiple of {h} heads, got {tuple(query.shape)}")
    sq, n_exact = layer.quantized_tokens, layer.res_k.shape[2]
    visible = sq + n_exact - start
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != visible:
            raise ValueError(f"expected a bool mask over {visible} keys, got {attention_mask.dtype} "
                             f"{tuple(attention_mask.shape)}")
        attention_mask = attention_mask.reshape(attention_mask.shape[0], visible).expand(b, visible)
        attention_mask = attention_mask.to(torch.uint8).contiguous()
    scaling = d**-0.5 if scaling is None else float(scaling)
    dt = query.dtype if query.dtype in cpu_kernels.ROW_DTYPES else torch.float32  # what the kernel reads
    plan = layer._rotation_plan()
    off, lev, bits, centers = layer._channel_layout
    kmid, khalf = (layer.k_mid, layer.k_half) if o.scale_bits == 8 else (_f32(layer.k_mid), _f32(layer.k_half))
    out = torch.empty(b, 1, hq, d, dtype=dt)  # the kernel writes (B, H, R, D): the same memory, query head h·R + r
    ints = dict(B=b, H=h, R=hq // h, D=d, G=layer.group, m=sq // layer.group, gb=layer.k_codes.shape[-1],
                K=centers.shape[-1], nd=0 if plan.cosd is None else plan.cosd.shape[1],
                rh=0 if plan.cosd is None else plan.cosd.shape[0], n_sink=layer.sink_k.shape[2], n_exact=n_exact,
                start=start, pv=layer.v_codes.shape[-1], bits_v=o.bits_v, scale_bits=o.scale_bits,
                rms_values=int(o.values == "rms"))
    cpu_kernels.decode_step(ints, dict(
        kcodes=layer.k_codes, ch_off=off, ch_levels=lev, ch_bits=bits, kcent=centers, kmid=kmid, khalf=khalf,
        base_cos=plan.base_cos, base_sin=plan.base_sin, cosd=plan.cosd, sind=plan.sind, delta=plan.delta,
        q=query.to(dt).contiguous(), sink_k=_held(layer.sink_k, None, dt), sink_v=_held(layer.sink_v, None, dt),
        xk=_held(layer.res_k, layer.res_k_scale, dt), xv=_held(layer.res_v, layer.res_v_scale, dt),
        xk_scale=layer.res_k_scale, xv_scale=layer.res_v_scale, vcodes=layer.v_codes, vcent=layer._dev_tables.v_centers,
        vscale=_f32(layer.v_scale) if o.values == "rms" else layer.v_scale, mask=attention_mask, out=out,
        vrot=layer._value_rotation(query.device) if o.values == "hadamard" else None,
    ), scaling)
    return out.to(query.dtype)
