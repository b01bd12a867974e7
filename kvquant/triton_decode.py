"""Triton decode attention on packed KV codes (optional: needs ``triton``).

``decode_attention(q, k_codes, k_centers, k_offset, k_scale, v_codes, v_centers, v_scale, bits)``
computes ``softmax(q·K̂ᵀ·scaling)·V̂`` for 1..few query tokens straight from the packed codes of
:class:`kvquant.cache.KVQuantCache` (layout in :mod:`kvquant.decode`); the keys and values are
never written out in full precision.

Kernel 1 (grid ``B·H_kv × splits``): one program per (batch row, KV head, chunk of the
sequence). Its ``G = H / H_kv`` query heads × ``Tq`` query tokens form the rows of one tile
(GQA: every key/value byte is read once for all of them). Per block of ``BLOCK_N`` tokens it
loads the packed bytes, extracts the codes with shifts, looks the centers up in the head's small
table, and runs an online softmax:

    q·k̂ = Σ_j (q_j·scale_j)·center[code_j] + Σ_j q_j·offset_j    (per-channel affine folded into q)
    p·v̂ = Σ_s (p_s·v_scale_s)·center_v[code_s]                  (per-token scale folded into p)

and writes its partial ``(max, sum, p·V)``. Kernel 2 (grid ``B·H_kv``) combines the splits
(split-K over the sequence, log-sum-exp rescaling) and writes ``(B, H, Tq, D)``.

Bits 1, 2, 4 and 8 (codes never straddle bytes). On a machine without a GPU the kernels run under
Triton's interpreter: ``TRITON_INTERPRET=1`` must be in the environment before Python starts
(torch and transformers import triton, and triton's own library functions are jitted at import);
this is how the tests check the kernels against :func:`kvquant.decode.decode_attention_reference`.
"""

from __future__ import annotations

import math
import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - depends on the environment
    triton = tl = None
    _IMPORT_ERROR = e

__all__ = ["available", "decode_attention", "SUPPORTED_BITS"]

SUPPORTED_BITS = (1, 2, 4, 8)
_LOG2E = 1.4426950408889634


def available() -> tuple[bool, str]:
    """(True, "") when the kernel can run here: triton importable, and a CUDA device or
    ``TRITON_INTERPRET=1``; else (False, why)."""
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False, "no CUDA device and TRITON_INTERPRET is not 1"
    from triton.runtime.interpreter import InterpretedFunction

    if not (isinstance(tl.sum, InterpretedFunction) and isinstance(_split_kernel, InterpretedFunction)):
        return False, (
            "TRITON_INTERPRET=1 was set after triton was imported (torch and transformers import it); "
            "set it in the environment before starting Python"
        )
    return True, ""


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _tile_codes(base, n, n_ok, stride, PK: tl.constexpr, BITS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Codes (BLOCK_N, BLOCK_D) int32 of tokens ``n`` (rows ``base + n·stride``, PK packed bytes
    each). Bytes are loaded contiguously and split with shifts; ``join`` + ``reshape`` put the
    codes of one byte on consecutive channels (little-endian, as kvquant.packing)."""
    if BITS == 8:
        j = tl.arange(0, BLOCK_D)
        c = tl.load(base + n[:, None] * stride + j[None, :], mask=n_ok[:, None] & (j < PK)[None, :], other=0)
    elif BITS == 4:
        j = tl.arange(0, BLOCK_D // 2)
        x = tl.load(base + n[:, None] * stride + j[None, :], mask=n_ok[:, None] & (j < PK)[None, :], other=0)
        c = tl.reshape(tl.join(x & 15, x >> 4), (BLOCK_N, BLOCK_D))
    elif BITS == 2:
        j = tl.arange(0, BLOCK_D // 4)
        x = tl.load(base + n[:, None] * stride + j[None, :], mask=n_ok[:, None] & (j < PK)[None, :], other=0)
        # channel 4j + 2a + b holds the code at bits 2(2a + b): join(join(c0, c2), join(c1, c3))
        c = tl.reshape(tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6)), (BLOCK_N, BLOCK_D))
    else:  # 1 bit: each channel reads its byte
        dd = tl.arange(0, BLOCK_D)
        x = tl.load(base + n[:, None] * stride + (dd // 8)[None, :], mask=n_ok[:, None] & (dd // 8 < PK)[None, :],
                    other=0)
        c = (x >> (dd % 8).to(tl.uint8)[None, :]) & 1
    return c.to(tl.int32)


@_jit
def _split_kernel(
    Q, KC, KCENT, KOFF, KSCALE, VC, VCENT, VSCALE, MPART, LPART, OPART,
    S, CHUNK, NSPLIT, HKV, qk_scale,
    sqb, sqh, sqt,
    skb, skh, skn,
    svb, svh, svn,
    ssb, ssh, ssn,
    vcent_sh,
    G: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr,
    BITS_K: tl.constexpr, BITS_V: tl.constexpr, PK_K: tl.constexpr, PK_V: tl.constexpr, KLEV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, FP16_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV

    rows = tl.arange(0, BLOCK_M)
    g = rows // TQ
    t = rows % TQ
    row_ok = rows < G * TQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q_ptrs = Q + b * sqb + (hk * G + g)[:, None] * sqh + t[:, None] * sqt + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    ksc = tl.load(KSCALE + hk * D + d, mask=d_ok, other=0.0)
    koff = tl.load(KOFF + hk * D + d, mask=d_ok, other=0.0)
    qs = q * ksc[None, :] * qk_scale  # scores in log2 units
    bias = tl.sum(q * koff[None, :], 1) * qk_scale
    if FP16_DOT:
        qs_dot = qs.to(tl.float16)
    else:
        qs_dot = qs

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, S)
    last_allowed = S - TQ + t  # causal limit of each row
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        kcode = _tile_codes(KC + b * skb + hk * skh, n, n_ok, skn, PK_K, BITS_K, BLOCK_N, BLOCK_D)
        kc = tl.load(KCENT + hk * KLEV + kcode)
        if FP16_DOT:
            s = tl.dot(qs_dot, tl.trans(kc.to(tl.float16)))
        else:
            s = tl.dot(qs_dot, tl.trans(kc), input_precision="ieee")
        s = s + bias[:, None]
        valid = n_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            valid = valid & (n[None, :] <= last_allowed[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        vcode = _tile_codes(VC + b * svb + hk * svh, n, n_ok, svn, PK_V, BITS_V, BLOCK_N, BLOCK_D)
        vc = tl.load(VCENT + hk * vcent_sh + vcode)
        vsc = tl.load(VSCALE + b * ssb + hk * ssh + n * ssn, mask=n_ok, other=0.0).to(tl.float32)
        pv = p * vsc[None, :]
        if FP16_DOT:
            acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float16), vc.to(tl.float16))
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, vc, input_precision="ieee")
        m_i = m_new

    part = pid_bh * NSPLIT + pid_s
    tl.store(MPART + part * BLOCK_M + rows, m_i)
    tl.store(LPART + part * BLOCK_M + rows, l_i)
    tl.store(OPART + (part * BLOCK_M + rows)[:, None] * BLOCK_D + d[None, :], acc)


@_jit
def _combine_kernel(
    MPART, LPART, OPART, OUT, NSPLIT, HKV,
    sob, soh, sot,
    G: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_run = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    o_run = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, NSPLIT):
        part = pid_bh * NSPLIT + sp
        m_s = tl.load(MPART + part * BLOCK_M + rows)
        l_s = tl.load(LPART + part * BLOCK_M + rows)
        o_s = tl.load(OPART + (part * BLOCK_M + rows)[:, None] * BLOCK_D + d[None, :])
        m_new = tl.maximum(m_run, m_s)
        a = tl.exp2(m_run - m_new)
        w = tl.exp2(m_s - m_new)
        l_run = l_run * a + l_s * w
        o_run = o_run * a[:, None] + o_s * w[:, None]
        m_run = m_new
    out = o_run / tl.where(l_run > 0, l_run, 1.0)[:, None]
    g = rows // TQ
    t = rows % TQ
    ok = (rows < G * TQ)[:, None] & (d < D)[None, :]
    ptrs = OUT + b * sob + (hk * G + g)[:, None] * soh + t[:, None] * sot + d[None, :]
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=ok)


def default_splits(batch_heads: int, seq: int, block_n: int, device: torch.device) -> int:
    """Splits of the sequence: about two waves of programs on the GPU, ≥ 4 blocks per split."""
    blocks = max(1, math.ceil(seq / block_n))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = math.ceil(2 * sms / max(batch_heads, 1))
    else:
        want = 4
    return max(1, min(want, blocks // 4 if blocks >= 8 else blocks))


def decode_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_centers: torch.Tensor,
    k_offset: torch.Tensor,
    k_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_centers: torch.Tensor,
    v_scale: torch.Tensor,
    bits: int,
    scaling: float | None = None,
    *,
    bits_v: int | None = None,
    causal: bool = True,
    num_splits: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton version of :func:`kvquant.decode.decode_attention_reference` (same arguments, no
    ``attention_mask``): ``(B, H, Tq, D)`` in q's dtype."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"Triton decode attention is unavailable: {why}")
    bits_v = bits if bits_v is None else bits_v
    if bits not in SUPPORTED_BITS or bits_v not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got keys {bits}, values {bits_v}")
    b, h, tq, d = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if s == 0:
        raise ValueError("empty KV cache")
    g = h // hkv
    scaling = d**-0.5 if scaling is None else float(scaling)
    dev = q.device
    k_codes, v_codes = k_codes.contiguous(), v_codes.contiguous()
    v_scale = v_scale.contiguous()
    q = q.contiguous()
    kcent = k_centers.float().contiguous()
    koff, ksc = k_offset.float().contiguous(), k_scale.float().contiguous()
    vcent = v_centers.float().contiguous()
    vcent_sh = 0 if vcent.ndim == 1 else vcent.shape[1]

    block_m = max(16, triton.next_power_of_2(g * tq))
    block_d = max(16, triton.next_power_of_2(d))
    splits = num_splits or default_splits(b * hkv, s, block_n, dev)
    chunk = math.ceil(math.ceil(s / splits) / block_n) * block_n
    splits = math.ceil(s / chunk)

    m_part = torch.empty(b * hkv * splits * block_m, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    o_part = torch.empty(b * hkv * splits * block_m * block_d, dtype=torch.float32, device=dev)
    out = torch.empty(b, h, tq, d, dtype=q.dtype, device=dev)
    fp16_dot = q.dtype in (torch.float16, torch.bfloat16)
    _split_kernel[(b * hkv, splits)](
        q, k_codes, kcent, koff, ksc, v_codes, vcent, v_scale, m_part, l_part, o_part,
        s, chunk, splits, hkv, scaling * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        vcent_sh,
        G=g, TQ=tq, D=d, BITS_K=bits, BITS_V=bits_v, PK_K=k_codes.shape[-1], PK_V=v_codes.shape[-1],
        KLEV=kcent.shape[-1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=bool(causal and tq > 1), FP16_DOT=fp16_dot,
    )
    _combine_kernel[(b * hkv,)](
        m_part, l_part, o_part, out, splits, hkv,
        out.stride(0), out.stride(1), out.stride(2),
        G=g, TQ=tq, D=d, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out
