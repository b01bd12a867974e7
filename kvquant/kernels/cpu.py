"""Decode attention from the KV cache's codes on the CPU: the C kernel of ``csrc/decode_cpu.c``,
compiled on first use with the system C compiler and called through ctypes.

Why C: a cache of ~4-bit codes holds an eighth of the bytes of a float32 cache, and a step gains
from that only if it does not first write every held key and value out in float32 (what the
dequantize path does). On the CPUs measured a step is not memory-bound (its bytes read are 2–33%
of the copy bandwidth, BENCHMARKS.md "Decode speed"): the kernel's arithmetic per code sets its
speed. :func:`decode_step` reads the codes once per step, one
key group at a time: each channel's keys from its codes (8 at a time with AVX2 permutes for ≤ 16
levels, gathers beyond; 16 at a time with AVX-512, one permute for ≤ 16 levels), then the rotation and
the dot products (8 or 16 tokens at a time) with the query rows' sums held in registers; and runs the exact tokens, the mask, the softmax and the value sums (8 tokens' value
rows at once) in the same call, so nothing of size (tokens × head_dim) is written and no torch op
runs per token. Threads (torch's count) take (batch row, KV head, span of key groups) tasks; a
row's spans are merged as in flash-decoding, so a batch-1 step with 3 KV heads still uses every
thread.

Layout read (:class:`kvquant.cache.KVQuantCache`, ``channel-group`` keys, quantized values):

* keys: per batch row and group of G tokens one record of ``group_bytes`` bytes
  (:class:`kvquant.core.packing.ChannelPacking`; :meth:`~kvquant.core.packing.ChannelPacking.channel_offsets`
  gives each (head, channel)'s byte offset in it), group ``(mid, half)`` per channel as stored
  (8-bit codes decoded with :func:`kvquant.core.groupnorm.load_scales`'s own table, or fp16 given as
  float32), centers per channel ``(H, D, K)``. ``k̂ = centers[code]·half + mid`` — the cache's
  arithmetic (:func:`kvquant.core.quantizer.decode_groups`).
* rotation (pre-RoPE keys): a key at position ``p = p₀ + δ`` (``p₀`` its group's base position)
  is rotated by ``R(p) = R(p₀)·R(δ)``: the query is rotated back by ``R(p₀)`` once per group and
  the keys by ``R(δ)`` from ``(r/2, Δ)`` tables of the model's own ``a·cos(θδ)``, ``a·sin(θδ)``
  (``Δ = G`` while positions are the stream index), so no per-token cos/sin is read. This differs
  from transformers' direct ``cos(θp)`` by the float rounding of the angle only.
* values: codes of ``bits`` bits along head_dim, ``v̂ = centers[code]·half + mid`` per token
  (``minmax``: 8-bit (mid, half) codes) or ``centers[code]·RMS`` (``rms``); for ``hadamard`` the
  codes are of ``v·H`` (``vrot``, (D, D)): the coded tokens' weighted values are summed apart and
  that sum multiplied by ``H`` once per span (H symmetric), the exact tokens' added as they are.
* the query ``(B, H, R, D)`` and the output in the model's dtype (float32, bfloat16 or float16),
  read and written as they are — the softmax scale applied in the kernel, in float32.
* exact tokens: the sinks ``(B, H, n_sink, D)`` in the model's dtype, laid over their slots (codes
  or residual), and the residual ``(B, H, n_exact, D)``, in the model's dtype or — the INT8 newest
  group — its int8 codes read as held with their fp16 per-token scales (``codes·scale``,
  :meth:`kvquant.cache.store.KVStore._decode_tail`'s arithmetic); the mask ``(B, visible)`` uint8,
  1 = attend.

The same library appends tokens to a layer's INT8 residual (:func:`append_int8`,
``kvq_append_int8``): encoding and concatenation in one pass, bit for bit
:meth:`kvquant.cache.store.KVStore._encode_tail` and ``torch.cat``, in place of a dozen torch ops
per decoding step.

Build: ``$CC`` (default ``cc``; GCC or clang: the kernel uses GNU C vector extensions) with
``-O3 -fPIC -shared``, ``-fopenmp`` when the compiler takes
it, ``-mavx2 -mfma -mavx512f`` where ``/proc/cpuinfo`` lists AVX-512 F, else ``-mavx2 -mfma``
when torch reports AVX2 on this CPU (:func:`lanes` says which path was built: 16 or 8 floats); the library is cached in
``$KVQUANT_HOME/kernels/`` under a hash of the source, flags and compiler, written to a temp
file and renamed (a killed build leaves no half-written library). :func:`available` says
whether it builds here, and why not.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from kvquant.core.groupnorm import load_scales
from kvquant.kernels.build import KernelUnavailable, build_library, cpu_features, loads

__all__ = ["available", "append_int8", "decode_step", "lanes", "Step", "KernelUnavailable", "DIGITS3", "DIGITS5"]

_SOURCE = Path(__file__).with_name("csrc") / "decode_cpu.c"
_ABI = 7

#: Base-3 digits of a byte (5 codes of 3 levels per byte) and base-5 digits of a 7-bit word (3
#: codes of 5 levels): :func:`kvquant.core.packing.pack_levels`'s layout, as lookup tables.
DIGITS3 = torch.from_numpy(np.array([[(w // 3**i) % 3 for i in range(5)] for w in range(256)], dtype=np.uint8))
DIGITS5 = torch.from_numpy(np.array([[(w // 5**i) % 5 for i in range(3)] for w in range(128)], dtype=np.uint8))
#: The half-range of each 8-bit exponent code e at index e + 128 (load_scales' own values).
_CODES = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)
HALF_OF_CODE = load_scales(torch.zeros(256, dtype=torch.int8), _CODES, 8)[1].contiguous()

_INTS = ("B", "H", "R", "D", "G", "m", "gb", "K", "nd", "rh", "n_sink", "n_exact", "start", "pv", "bits_v",
         "scale_bits", "rms_values", "nthreads")
_PTRS = ("kcodes", "ch_off", "ch_levels", "ch_bits", "kcent", "kmid", "khalf", "half_of_code", "base_cos", "base_sin",
         "cosd", "sind", "delta", "q", "sink_k", "sink_v", "xk", "xv", "xk_scale", "xv_scale", "vcodes", "vcent", "vscale", "mask", "out",
         "d3", "d5", "vrot")


class Step(ctypes.Structure):
    """The arguments of one ``kvq_decode_step`` (``kvq_step`` in ``csrc/decode_cpu.c``; shapes there)."""

    _fields_ = ([(n, ctypes.c_int64) for n in _INTS] + [(n, ctypes.c_void_p) for n in _PTRS]
                + [("dtype", ctypes.c_int64), ("scale", ctypes.c_double)])


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-std=c99", "-fno-math-errno"]
    if "avx512f" in cpu_features():
        flags += ["-mavx2", "-mfma", "-mavx512f"]
    elif torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    dll = build_library(_SOURCE, _flags(), "CPU decode kernel",
                        "or build the cache with make_cache(..., decode='dequantize')")
    if dll.kvq_abi_version() != _ABI:
        raise KernelUnavailable(f"{dll._name} reports ABI {dll.kvq_abi_version()}, expected {_ABI}: remove it")
    dll.kvq_decode_step.argtypes = [ctypes.POINTER(Step)]
    dll.kvq_decode_step.restype = ctypes.c_int
    dll.kvq_append_int8.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 5
    dll.kvq_append_int8.restype = None
    return dll


def available() -> tuple[bool, str]:
    """(True, "") when the kernel builds and loads here, else (False, why)."""
    return loads(_library)


def lanes() -> int:
    """Floats per vector of the loaded kernel's widest path: 16 where it was built for AVX-512, else 8."""
    return int(_library().kvq_decode_lanes())


_DTYPES = {"kcodes": torch.uint8, "ch_off": torch.int64, "ch_levels": torch.int64, "ch_bits": torch.int64,
           "delta": torch.int32, "vcodes": torch.uint8, "mask": torch.uint8, "d3": torch.uint8, "d5": torch.uint8,
           "xk_scale": torch.float16, "xv_scale": torch.float16}
#: Inputs that may also be int8: 8-bit group scales, INT8 value scales, the INT8 newest tokens.
_INT8_OK = frozenset(("kmid", "khalf", "vscale", "xk", "xv"))
#: Inputs (and the output) held in the model's dtype: the kernel reads and writes them as they are.
_IN_MODEL_DTYPE = frozenset(("q", "out", "sink_k", "sink_v", "xk", "xv"))
#: The model dtypes the library reads and writes rows in, by their code in the C source.
ROW_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def decode_step(ints: dict[str, int], tensors: dict[str, torch.Tensor | None], scale: float) -> None:
    """Run ``kvq_decode_step`` on ``tensors`` (contiguous CPU tensors: ``q``, ``out``, the sinks and
    an exact residual ``xk``/``xv`` in the query's dtype — float32, bfloat16 or float16 —, the rest
    float32 unless listed in :data:`_DTYPES`; ``kmid``/``khalf`` int8 for 8-bit scales, ``vscale``
    int8 for minmax values, ``xk``/``xv`` int8 with their fp16 ``xk_scale``/``xv_scale``; None for
    an absent optional input), the sizes ``ints`` and the softmax ``scale`` (the kernel multiplies
    the query by it in float32, as ``q.float() * scale``); it writes ``tensors["out"]``."""
    model_dtype = tensors["q"].dtype
    if model_dtype not in ROW_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {model_dtype}")
    step = Step(**ints, nthreads=torch.get_num_threads(), half_of_code=HALF_OF_CODE.data_ptr(),
                d3=DIGITS3.data_ptr(), d5=DIGITS5.data_ptr(), dtype=ROW_DTYPES[model_dtype], scale=scale)
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype == torch.int8 and name in _INT8_OK:
            want = torch.int8
        else:
            want = model_dtype if name in _IN_MODEL_DTYPE else _DTYPES.get(name, torch.float32)
        if t.dtype != want or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"{name} must be a contiguous CPU {want} tensor, got {t.dtype} {tuple(t.shape)} on {t.device}")
        if name in ("xk", "xv") and (t.dtype == torch.int8) != (tensors.get(f"{name}_scale") is not None):
            raise ValueError(f"{name} is INT8 codes exactly when {name}_scale is given, got {t.dtype} and "
                             f"{name}_scale {tensors.get(f'{name}_scale') is not None}")
        setattr(step, name, t.data_ptr())
    if _library().kvq_decode_step(ctypes.byref(step)):
        raise MemoryError("kvq_decode_step could not allocate its scratch buffers")


def append_int8(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT8 residual ``codes`` (B, H, n, D) int8 and ``scales`` (B, H, n) fp16 with the tokens
    ``x`` (B, H, m, D; float32, bfloat16 or float16, on the CPU) appended, as new tensors — in one
    pass of ``kvq_append_int8``, equal bit for bit to ``torch.cat`` of the held tensors and
    :meth:`kvquant.cache.store.KVStore._encode_tail` of ``x`` (finite ``x``). Raises
    :class:`KernelUnavailable` where the kernel does not build."""
    dll = _library()
    if x.dtype not in ROW_DTYPES or codes.dtype != torch.int8 or scales.dtype != torch.float16:
        raise ValueError(f"append_int8 takes int8 codes, fp16 scales and float32/bfloat16/float16 tokens, got "
                         f"{codes.dtype}, {scales.dtype}, {x.dtype}")
    b, h, n, d = codes.shape
    if x.shape[:2] != (b, h) or x.shape[3] != d or scales.shape != (b, h, n):
        raise ValueError(f"append_int8: tokens {tuple(x.shape)} do not fit codes {tuple(codes.shape)} "
                         f"and scales {tuple(scales.shape)}")
    if not (codes.is_cpu and scales.is_cpu and x.is_cpu):
        raise ValueError("append_int8 runs on CPU tensors only")
    codes, scales, x = codes.contiguous(), scales.contiguous(), x.contiguous()
    m = x.shape[2]
    out_codes = torch.empty(b, h, n + m, d, dtype=torch.int8)
    out_scales = torch.empty(b, h, n + m, dtype=torch.float16)
    dll.kvq_append_int8(b * h, n, m, d, ROW_DTYPES[x.dtype], codes.data_ptr(), scales.data_ptr(), x.data_ptr(),
                        out_codes.data_ptr(), out_scales.data_ptr())
    return out_codes, out_scales
