"""Triton decode attention on the deployed KV cache layout (optional: needs ``triton``).

:func:`decode_step` is the GPU counterpart of :func:`kvquant.kernels.dispatch.attend` (same
arguments, same result within float rounding): one query token per row over a
:class:`kvquant.cache.KVQuantCache` layer in ``channel-group`` mode, read from the codes.

Kernel 1 (grid ``B·H_kv × splits``): one program per (batch row, KV head, chunk of the quantized
tokens — split-K over the sequence). Its ``R = H_q / H_kv`` query rows (padded to 16 for
``tl.dot``; GQA: every code byte is read once for all of them) meet blocks of ``BLOCK_T`` tokens
inside one group:

* key codes: channel j's codes are a bit stream at byte ``offset[j]`` of the group record —
  ``levels[j]`` a power of two: ``log2 levels`` bits per code; 3 and 5 levels: base-n digits of
  bytes / 7-bit words (:class:`kvquant.core.packing.ChannelPacking`) — read as two bytes, shifted,
  divided by the digit's power; ``k̂ = centers[j, code]·half + mid`` with the group's 8-bit
  (or fp16) scales decoded in the kernel;
* rotation from positions (pre-RoPE keys): ``cos``/``sin`` of ``position·inv_freq`` computed in
  the kernel (no per-token table read); ``q·R(p)k̂ = Σ_j k̂_j (q_j cos_j + q̃_j sin_j)`` with
  ``q̃`` the query rotated by 90° (``q̃_i = q_{i+r/2}``, ``q̃_{i+r/2} = −q_i``), so the scores are
  two ``tl.dot`` of the query rows with ``k̂·cos`` and ``k̂·sin``;
* values: ``bits_v`` codes along head_dim, ``v̂ = centers_v[code]·half_s + mid_s`` (8-bit
  per-token codes) or ``·RMS_s``; online softmax (base 2), ``acc += p·V̂`` by ``tl.dot``.

Kernel 2 (grid ``B·H_kv``) combines the splits (log-sum-exp rescaling) into the quantized part's
normalised output and log-sum-exp; the exact sinks and residual (few tokens) are attended in
torch and merged by their log-sum-exp.

On a machine without a GPU the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1``
must be in the environment before Python starts (torch and transformers import triton); this is
how the tests check the kernel against the C path and the dequantize reference.
"""

from __future__ import annotations

import math
import os

import torch

from kvquant.kernels import cpu as cpu_kernels

try:  # optional dependency
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - depends on the environment
    triton = tl = None
    _IMPORT_ERROR = e

__all__ = ["available", "decode_step"]

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
def _digit_power(k, base: tl.constexpr):
    """base**k for k in 0..4 (int32 tensors)."""
    return tl.where(k == 0, 1, tl.where(k == 1, base, tl.where(k == 2, base * base,
                    tl.where(k == 3, base * base * base, base * base * base * base))))


@_jit
def _key_codes(rec, off, lev, nb, t, ok, GB):
    """Codes (D, T) int32 of channels (off, lev, nb: (D, 1)) at tokens t (1, T) of one group record."""
    is3 = lev == 3
    is5 = lev == 5
    bitpos = tl.where(is3, (t // 5) * 8, tl.where(is5, (t // 3) * 7, t * nb))
    width = tl.where(is3, 8, tl.where(is5, 7, nb))
    byte = off + (bitpos >> 3)
    sh = bitpos & 7
    b0 = tl.load(rec + byte, mask=ok, other=0).to(tl.int32)
    b1 = tl.load(rec + byte + 1, mask=ok & (byte + 1 < GB), other=0).to(tl.int32)
    word = ((b0 | (b1 << 8)) >> sh) & ((1 << width) - 1)
    div = tl.where(is3, _digit_power(t % 5, 3), tl.where(is5, _digit_power(t % 3, 5), 1))
    return (word // div) % lev


@_jit
def _scales(mid_ptr, half_ptr, idx, ok, HALF_TAB, SCALE8: tl.constexpr):
    """(mid, half) float32 of stored scales: 8-bit codes (load_scales' table) or float."""
    if SCALE8:
        e = tl.load(half_ptr + idx, mask=ok, other=0).to(tl.int32)
        half = tl.load(HALF_TAB + e + 128, mask=ok, other=0.0)
        mid = tl.load(mid_ptr + idx, mask=ok, other=0).to(tl.float32) * half / 16.0
    else:
        half = tl.load(half_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        mid = tl.load(mid_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    return mid, half


@_jit
def _split_kernel(
    Q, QT, KC, OFF, LEV, NB, KCENT, KMID, KHALF, HALF_TAB, INVF, POS,
    VC, VCENT, VMID, VHALF, MASK, MPART, LPART, OPART,
    S, FIRST, START, POS0, M, GB, K, HKV, ROT_A, CHUNK, NSPLIT, MASK_LEN,
    D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    RH: tl.constexpr, RHM: tl.constexpr, PV: tl.constexpr, BITS_V: tl.constexpr,
    SCALE8: tl.constexpr, MINMAX: tl.constexpr, HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = tl.arange(0, RP)
    j = tl.arange(0, BLOCK_D)
    j_ok = j < D
    q = tl.load(Q + (pid_bh * RP + rows)[:, None] * D + j[None, :], mask=j_ok[None, :], other=0.0)
    qt = tl.load(QT + (pid_bh * RP + rows)[:, None] * D + j[None, :], mask=j_ok[None, :], other=0.0)
    off = tl.load(OFF + h * D + j, mask=j_ok, other=0)[:, None]
    lev = tl.load(LEV + h * D + j, mask=j_ok, other=2)[:, None]
    nb = tl.load(NB + h * D + j, mask=j_ok, other=1)[:, None]
    rot = j < 2 * RH
    invf = tl.load(INVF + j % RHM, mask=rot, other=0.0)[:, None]

    m_i = tl.full([RP], -1.0e30, tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, BLOCK_D], tl.float32)
    lo = tl.maximum(pid_s * CHUNK, (FIRST // BLOCK_T) * BLOCK_T)
    hi = tl.minimum(pid_s * CHUNK + CHUNK, S)
    for n0 in range(lo, hi, BLOCK_T):
        n = n0 + tl.arange(0, BLOCK_T)
        n_ok = (n >= FIRST) & (n < S)
        g = n0 // G
        t = (n % G)[None, :]
        ok = j_ok[:, None] & n_ok[None, :]
        rec = KC + (b * M + g) * GB
        code = _key_codes(rec, off, lev, nb, t, ok, GB)
        cent = tl.load(KCENT + (h * D + j[:, None]) * K + code, mask=ok, other=0.0)
        mid, half = _scales(KMID, KHALF, ((b * HKV + h) * M + g) * D + j, j_ok, HALF_TAB, SCALE8)
        k = cent * half[:, None] + mid[:, None]  # (D, T)
        if HAS_POS:
            pos = tl.load(POS + b * S + n, mask=n_ok, other=0).to(tl.float32)
        else:
            pos = (POS0 + n).to(tl.float32)
        ang = invf * pos[None, :]
        c = tl.where(rot[:, None], tl.cos(ang) * ROT_A, 1.0)
        s_ = tl.where(rot[:, None], tl.sin(ang) * ROT_A, 0.0)
        s = tl.dot(q, k * c, input_precision="ieee") + tl.dot(qt, k * s_, input_precision="ieee")  # (RP, T), log2 units
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * MASK_LEN + n - START, mask=n_ok, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # values (T, D)
        vbit = j * BITS_V
        vbyte = vbit >> 3
        vrow = VC + ((b * HKV + h) * S + n)[:, None] * PV
        vok = n_ok[:, None] & j_ok[None, :]
        v0 = tl.load(vrow + vbyte[None, :], mask=vok, other=0).to(tl.int32)
        v1 = tl.load(vrow + vbyte[None, :] + 1, mask=vok & (vbyte + 1 < PV)[None, :], other=0).to(tl.int32)
        vcode = ((v0 | (v1 << 8)) >> (vbit & 7)[None, :]) & ((1 << BITS_V) - 1)
        vc = tl.load(VCENT + vcode, mask=vok, other=0.0)
        sidx = (b * HKV + h) * S + n
        if MINMAX:
            vmid, vhalf = _scales(VMID, VHALF, sidx * 2, n_ok, HALF_TAB, True)
        else:
            vhalf = tl.load(VHALF + sidx, mask=n_ok, other=0.0).to(tl.float32)
            vmid = tl.zeros([BLOCK_T], tl.float32)
        v = vc * vhalf[:, None] + vmid[:, None]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    part = pid_bh * NSPLIT + pid_s
    tl.store(MPART + part * RP + rows, m_i)
    tl.store(LPART + part * RP + rows, l_i)
    tl.store(OPART + (part * RP + rows)[:, None] * BLOCK_D + j[None, :], acc)


@_jit
def _combine_kernel(MPART, LPART, OPART, OUT, LSE, NSPLIT, RP: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    rows = tl.arange(0, RP)
    j = tl.arange(0, BLOCK_D)
    m_run = tl.full([RP], -1.0e30, tl.float32)
    l_run = tl.zeros([RP], tl.float32)
    o_run = tl.zeros([RP, BLOCK_D], tl.float32)
    for sp in range(0, NSPLIT):
        part = pid_bh * NSPLIT + sp
        m_s = tl.load(MPART + part * RP + rows)
        l_s = tl.load(LPART + part * RP + rows)
        o_s = tl.load(OPART + (part * RP + rows)[:, None] * BLOCK_D + j[None, :])
        m_new = tl.maximum(m_run, m_s)
        a = tl.exp2(m_run - m_new)
        w = tl.exp2(m_s - m_new)
        l_run = l_run * a + l_s * w
        o_run = o_run * a[:, None] + o_s * w[:, None]
        m_run = m_new
    tl.store(OUT + (pid_bh * RP + rows)[:, None] * BLOCK_D + j[None, :], o_run / tl.where(l_run > 0, l_run, 1.0)[:, None])
    tl.store(LSE + pid_bh * RP + rows, tl.where(l_run > 0, m_run + tl.log2(tl.where(l_run > 0, l_run, 1.0)), -1.0e30))


def _splits(bh: int, tokens: int, block_t: int, device: torch.device) -> int:
    """About two waves of programs on the GPU, at least 4 token blocks per split."""
    blocks = max(1, math.ceil(tokens / block_t))
    want = math.ceil(2 * torch.cuda.get_device_properties(device).multi_processor_count / bh) if device.type == "cuda" else 2
    return max(1, min(want, max(blocks // 4, 1)))


def decode_step(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                start: int, *, block_t: int = 32, num_splits: int | None = None) -> torch.Tensor:
    """:func:`kvquant.kernels.dispatch.attend` with the quantized tokens read by the Triton kernel:
    (B, 1, H_q, D) in ``query``'s dtype."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"Triton decode attention is unavailable: {why}")
    b, hq, tq, d = query.shape
    h, o, dev = layer.tables.k_centers.shape[0], layer.options, query.device
    if tq != 1 or hq % h:
        raise ValueError(f"decode_step takes one query token and a multiple of {h} heads, got {tuple(query.shape)}")
    g, sq = layer.group, layer.quantized_tokens
    n_sink = min(layer.sink_k.shape[2], sq)  # sinks over code slots (any later ones are in the residual)
    if g % block_t:
        raise ValueError(f"block_t ({block_t}) must divide the group ({g})")
    rep, rp = hq // h, max(16, triton.next_power_of_2(hq // h))
    visible = sq + layer.res_k.shape[2] - start
    scaling = d**-0.5 if scaling is None else float(scaling)
    q = (query.float() * scaling).reshape(b, h, rep, d)
    if attention_mask is not None:
        attention_mask = attention_mask.reshape(attention_mask.shape[0], visible).expand(b, visible)
    # exact tokens (sinks over their slots, the residual): torch, natural-log units
    res_k, res_v = layer._residual()
    ex_k = torch.cat([layer.sink_k[:, :, start:n_sink], res_k[:, :, max(start - sq, 0):]], dim=2).float()
    ex_v = torch.cat([layer.sink_v[:, :, start:n_sink], res_v[:, :, max(start - sq, 0):]], dim=2).float()
    ex_s = q @ ex_k.transpose(-1, -2)
    if attention_mask is not None:
        cols = torch.cat([torch.arange(start, max(start, n_sink)), torch.arange(max(start, sq), sq + layer.res_k.shape[2])])
        ex_s = ex_s.masked_fill(~attention_mask[:, None, None, (cols - start).to(dev)], float("-inf"))
    first = max(start, n_sink)
    if sq <= first:
        out = torch.softmax(ex_s, -1).nan_to_num(0.0) @ ex_v
        return out.reshape(b, hq, 1, d).transpose(1, 2).to(query.dtype)
    qp = torch.zeros(b, h, rp, d, device=dev)
    qp[:, :, :rep] = q * _LOG2E
    if layer.rope is not None:  # pre-RoPE keys: rotated in the kernel from positions
        inv_freq, rot_a = layer.rope.frequencies()
        rh = inv_freq.numel()
    else:
        inv_freq, rot_a, rh = torch.zeros(1), 1.0, 0
    qt = torch.zeros_like(qp)
    qt[..., :rh], qt[..., rh : 2 * rh] = qp[..., rh : 2 * rh], -qp[..., :rh]
    off, lev, nb, centers = (x.to(dev) for x in layer._channel_layout)
    tab = cpu_kernels.HALF_OF_CODE.to(dev)  # load_scales' half-range of each 8-bit exponent code
    kmid, khalf = (layer.k_mid, layer.k_half) if o.scale_bits == 8 else (layer.k_mid.float(), layer.k_half.float())
    if o.values != "rms":  # minmax / hadamard: (B, H, S, 2) int8, mid at 2s, half at 2s + 1
        vmid = layer.v_scale.contiguous().view(-1)
        vhalf = vmid[1:]
    else:
        vmid = vhalf = layer.v_scale.float().contiguous()
    pos = layer.k_pos[:, 0].contiguous() if layer.k_pos is not None else torch.zeros(1, dtype=torch.int32, device=dev)
    mask = (attention_mask.to(torch.uint8).contiguous() if attention_mask is not None
            else torch.zeros(1, dtype=torch.uint8, device=dev))
    block_d = max(16, triton.next_power_of_2(d))
    splits = num_splits or _splits(b * h, sq - first, block_t, dev)
    chunk = math.ceil(math.ceil(sq / splits) / block_t) * block_t
    splits = math.ceil(sq / chunk)
    m_part = torch.empty(b * h * splits * rp, device=dev)
    l_part = torch.empty_like(m_part)
    o_part = torch.empty(b * h * splits * rp * block_d, device=dev)
    _split_kernel[(b * h, splits)](
        qp.contiguous(), qt.contiguous(), layer.k_codes.contiguous(), off.to(torch.int32), lev.to(torch.int32),
        nb.to(torch.int32), centers, kmid.contiguous(), khalf.contiguous(), tab, inv_freq.float().to(dev), pos,
        layer.v_codes.contiguous(), layer._dev_tables.v_centers.float(), vmid, vhalf, mask, m_part, l_part, o_part,
        sq, first, start, layer._seen - layer.held_tokens, sq // g, layer.k_codes.shape[-1], centers.shape[-1], h,
        float(rot_a), chunk, splits, visible,
        D=d, G=g, RP=rp, BLOCK_D=block_d, BLOCK_T=block_t, RH=rh, RHM=max(rh, 1), PV=layer.v_codes.shape[-1], BITS_V=o.bits_v,
        SCALE8=o.scale_bits == 8, MINMAX=o.values != "rms", HAS_POS=layer.k_pos is not None,
        HAS_MASK=attention_mask is not None,
    )
    out_q = torch.empty(b * h * rp, block_d, device=dev)
    lse_q = torch.empty(b * h * rp, device=dev)
    _combine_kernel[(b * h,)](m_part, l_part, o_part, out_q, lse_q, splits, RP=rp, BLOCK_D=block_d)
    out_q = out_q.view(b, h, rp, block_d)[:, :, :rep, :d]
    if o.values == "hadamard":  # the codes are of v H: the coded tokens' output rotated back (H symmetric)
        out_q = out_q @ layer._value_rotation(dev)
    lse_q = lse_q.view(b, h, rp)[:, :, :rep] / _LOG2E  # natural log
    lse_e = torch.logsumexp(ex_s, -1)
    top = torch.maximum(lse_q, lse_e)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w_q, w_e = torch.exp(lse_q - top), torch.exp(lse_e - top)
    out_e = torch.softmax(ex_s, -1).nan_to_num(0.0) @ ex_v
    total = w_q + w_e
    out = (out_q * w_q[..., None] + out_e * w_e[..., None]) / torch.where(total > 0, total, 1.0)[..., None]
    return out.reshape(b, hq, 1, d).transpose(1, 2).to(query.dtype)
