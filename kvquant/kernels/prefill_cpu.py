"""Causal prefill attention with ``Q·Kᵀ`` from INT8 codes on the CPU: the C kernel of
``csrc/prefill_cpu.c``, built on first use (:func:`kvquant.kernels.build.build_library`) and called
through ctypes; :func:`reference_attention` is the same math in torch (the simulated path).

Math, per query head (B, H, T, D) and its KV head (GQA: H / H_kv query heads share one), the T
keys at the positions of the T queries (a prefill without a past):

* keys smoothed, ``k' = k − k̄`` with ``k̄`` the mean of the T keys per channel (SageAttention's
  step: ``q·k̄`` is the same for every key of a query, so the softmax does not change, and the
  keys' common offset leaves their per-token range), then each channel's range balanced between
  queries and keys, ``q_c/α_c`` and ``α_c·k'_c`` (SmoothQuant's migration; :func:`smoothed_codes`);
* those as INT8 codes per token with an fp16 scale (:func:`kvquant.core.int8_rows.encode_int8_rows`,
  the cache's own newest-group format): ``q/α ≈ c_q·s_q``, ``α·k' ≈ c_k·s_k``;
* scores ``s_ij = scale · s_q,i · s_k,j · Σ_c c_q,ic·c_k,jc`` — the dot an exact int32 (the kernel
  takes the query codes as unsigned bytes ``c_q + 128`` for VNNI's ``vpdpbusd`` and subtracts
  ``128·Σ_c c_k,jc``) —, over the visible keys ``j ≤ i`` (and ``j > i − window`` with a sliding window);
* softmax in float32, its probabilities rounded to bf16 and the values read in bf16, their sums
  in float32 (AVX512-BF16 ``vdpbf16ps``).

Layouts the kernel reads (made here in torch): query codes ``(B·H, T, D)`` uint8; keys
``(B·H_kv, Tp/16, D/4, 16, 4)`` int8 — 16 keys' 4 channels side by side, one 64-byte VNNI operand
— with their code sums and scales ``(B·H_kv, Tp)``, ``Tp`` = T rounded up to 32; values
``(B·H_kv, Tp/2, D, 2)`` bf16 — pairs of keys side by side, one ``vdpbf16ps`` operand. The output
is float32 ``(B, H, T, D)``.

Build flags: ``-mavx512f -mavx512bw -mavx512vnni -mavx512bf16`` where ``/proc/cpuinfo`` lists those
features (the kernel's VNNI path), else ``-mavx2 -mfma`` on AVX2 CPUs and plain C elsewhere — the
same integers and bf16 products, summed in another order.
"""

from __future__ import annotations

import ctypes
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from kvquant.core.int8_rows import encode_int8_rows
from kvquant.kernels.build import KernelUnavailable, build_library, cpu_features, loads

__all__ = ["available", "prefill_attention", "reference_attention", "smoothed_codes", "vnni"]

_SOURCE = Path(__file__).with_name("csrc") / "prefill_cpu.c"
_ABI = 1
_KEY_BLOCK = 32  # KB in the C source
_VNNI_FEATURES = ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("BH", "rep", "T", "Tp", "D", "window", "nthreads")]
                + [(n, ctypes.c_void_p) for n in ("qu", "qscale", "kp", "ksum", "kscale", "vp", "out")])


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-std=gnu99", "-fno-math-errno"]
    if all(f in cpu_features() for f in _VNNI_FEATURES):
        flags += ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx512bf16"]
    elif torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    dll = build_library(_SOURCE, _flags(), "CPU prefill kernel", "or prefill with SDPA (prefill='sdpa')")
    if dll.kvq_prefill_abi_version() != _ABI:
        raise KernelUnavailable(f"{dll._name} reports ABI {dll.kvq_prefill_abi_version()}, expected {_ABI}: remove it")
    dll.kvq_prefill_attention.argtypes = [ctypes.POINTER(_Args)]
    dll.kvq_prefill_attention.restype = ctypes.c_int
    return dll


def available() -> tuple[bool, str]:
    """(True, "") when the kernel builds and loads here, else (False, why)."""
    return loads(_library)


def vnni() -> bool:
    """Whether the loaded kernel runs its AVX-512 VNNI / BF16 path."""
    return bool(_library().kvq_prefill_vnni())


def smoothed_codes(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_q, s_q, c_k, s_k)``: INT8 codes and fp16 scales per token of ``q`` (B, H, T, D) and ``k``
    (B, H_kv, T, D), smoothed and balanced so that ``(c_q·s_q)·(c_k·s_k) ≈ q·(k − k̄)``:
    the keys less their mean ``k̄`` over the T tokens, then each channel's range moved between the
    two sides (SmoothQuant's migration), ``q_c / α_c`` and ``α_c · k'_c`` encoded with
    ``α_c = sqrt(max|q_c| / max|k'_c|)`` per KV head and channel over the T tokens and the query
    heads sharing it (1 where either side is 0)."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    kf, qf = k.float(), q.float()
    kf = kf - kf.mean(dim=2, keepdim=True)
    q_max = qf.abs().amax(2).view(b, hk, h // hk, d).amax(2)  # (B, H_kv, D)
    k_max = kf.abs().amax(2)
    alpha = torch.where((q_max > 0) & (k_max > 0), (q_max / k_max).sqrt(), 1.0)
    c_q, s_q = encode_int8_rows(qf / alpha.repeat_interleave(h // hk, 1)[:, :, None])
    c_k, s_k = encode_int8_rows(kf * alpha[:, :, None])
    return c_q, s_q, c_k, s_k


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    b, h, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (t, d) or h % k.shape[1]:
        raise ValueError(f"prefill attention takes q (B, H, T, D) and k, v (B, H_kv, T, D) with H a multiple of "
                         f"H_kv, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        window: int = 0) -> torch.Tensor:
    """The kernel's math in torch, the simulated path: float32 (B, H, T, D).

    Scores in log2 units, ``Σ_c c_q·c_k`` (exact in float32: |Σ| ≤ 127²·D < 2²⁴) times
    ``s_q·scale·log₂e`` times ``s_k`` — the kernel's float products in its order. The kernel walks
    the keys in blocks of 32 (aligned at key 0) with a running max, so a probability is rounded to
    bf16 against the max ``m_b`` of the row's scores up to its key's block: ``p = bf16(2^(s − m_b))``,
    then scaled by ``2^(m_b − m)`` to the row's max m; the output is ``Σ p·bf16(v) / Σ p``. The
    kernel equals this up to float summation order and its 2^x polynomial (relative 2e-7)."""
    _check(q, k, v)
    c_q, s_q, c_k, s_k = smoothed_codes(q, k)
    rep = q.shape[1] // k.shape[1]
    dots = c_q.float() @ c_k.float().repeat_interleave(rep, 1).transpose(-1, -2)
    qs = s_q.float() * (scale * math.log2(math.e))
    scores = dots * qs[..., :, None] * s_k.float().repeat_interleave(rep, 1)[..., None, :]
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (j <= i) & ((j > i - window) if window > 0 else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    blocks = -(-t // _KEY_BLOCK)
    padded = F.pad(scores, (0, blocks * _KEY_BLOCK - t), value=float("-inf"))
    running = padded.unflatten(-1, (blocks, _KEY_BLOCK)).amax(-1).cummax(-1).values  # m_b (…, T, blocks)
    m_b = running.repeat_interleave(_KEY_BLOCK, -1)[..., :t]
    p = torch.exp2(scores - m_b).to(torch.bfloat16).float() * torch.exp2(m_b - running[..., -1:])
    p = torch.where(visible, p, 0.0)  # (−inf − −inf before a window's first visible block)
    vb = v.to(torch.bfloat16).float().repeat_interleave(rep, 1)
    return (p @ vb) / p.sum(-1, keepdim=True)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int = 0) -> torch.Tensor:
    """Causal attention of ``q`` (B, H, T, D) over ``k``, ``v`` (B, H_kv, T, D) (CPU tensors, any float
    dtype; D a multiple of 16) with ``Q·Kᵀ`` from INT8 codes: float32 (B, H, T, D), equal to
    :func:`reference_attention` up to float summation order. ``scale`` multiplies the scores;
    ``window`` > 0 limits query i to keys j > i − window. Threads: torch's count."""
    _check(q, k, v)
    b, h, t, d = q.shape
    hk = k.shape[1]
    if d % 16:
        raise ValueError(f"the prefill kernel needs head_dim a multiple of 16, got {d}")
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        raise ValueError("the prefill kernel runs on CPU tensors only")
    dll = _library()
    c_q, s_q, c_k, s_k = smoothed_codes(q, k)
    tp = -(-t // _KEY_BLOCK) * _KEY_BLOCK
    pad = (0, 0, 0, tp - t)
    qu = (c_q.to(torch.int16) + 128).to(torch.uint8).contiguous()
    qscale = (s_q.float() * (scale * math.log2(math.e))).contiguous()
    c_k = F.pad(c_k, pad)
    kp = c_k.view(b * hk, tp // 16, 16, d // 4, 4).permute(0, 1, 3, 2, 4).contiguous()
    ksum = c_k.sum(-1, dtype=torch.int32).contiguous()
    kscale = F.pad(s_k.float(), (0, tp - t)).contiguous()
    vp = F.pad(v.to(torch.bfloat16), pad).view(b * hk, tp // 2, 2, d).transpose(-1, -2).contiguous()
    out = torch.empty(b, h, t, d, dtype=torch.float32)
    args = _Args(BH=b * h, rep=h // hk, T=t, Tp=tp, D=d, window=max(window, 0), nthreads=torch.get_num_threads(),
                 qu=qu.data_ptr(), qscale=qscale.data_ptr(), kp=kp.data_ptr(), ksum=ksum.data_ptr(),
                 kscale=kscale.data_ptr(), vp=vp.data_ptr(), out=out.data_ptr())
    if dll.kvq_prefill_attention(ctypes.byref(args)):
        raise MemoryError("kvq_prefill_attention could not allocate its scratch buffers")
    return out
