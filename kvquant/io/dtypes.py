"""Which dtype a model is loaded in when the caller says ``"auto"``: the dtype it ships in, where the
device computes it natively, else float32 — said in a warning, never silently.

torch's CPU matmuls in bfloat16/float16 run on oneDNN kernels only where the CPU has the
instructions for them (AVX-512 with BF16/FP16 support, AMX); on an AVX2-only CPU they are emulated.
Measured on an AVX2-only AMD EPYC, 1 thread (`python eval/research/cpu_dtypes.py --tokens 2048
--layers 2 --repeats 1`): a 2048 × 576 × 1536 matmul 65× (bfloat16) and 62× (float16) the time of
float32, a forward pass of a 2-layer SmolLM2-shaped model 6.7× and 5.5×; the main job's calibration
in bfloat16 had not finished one of its 8 windows after 8 minutes, where float32 takes 40 s a window.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["auto_dtype", "native_dtype"]

_HALF = (torch.bfloat16, torch.float16)


def native_dtype(dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies matrices in ``dtype`` with hardware support: float32 everywhere;
    bfloat16 on CUDA where ``torch.cuda.is_bf16_supported()`` (Ampere on), float16 on CUDA; on the CPU
    where oneDNN has kernels for them (``torch.ops.mkldnn._is_mkldnn_bf16_supported`` /
    ``_is_mkldnn_fp16_supported``; a torch without these checks is taken at its word: native)."""
    device = torch.device(device)
    if dtype not in _HALF or device.type not in ("cpu", "cuda"):
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    check = getattr(torch.ops.mkldnn, name, None)
    return True if check is None else bool(check())


def auto_dtype(shipped: torch.dtype | None, device: str | torch.device = "cpu", name: str = "the model") -> torch.dtype | str:
    """The dtype to load ``name`` in for ``dtype="auto"``: ``shipped`` (the dtype it ships in; None:
    unknown, transformers reads its config and ``"auto"`` is returned) where ``device`` computes it
    natively (:func:`native_dtype`), else float32 with a warning naming the reason and the override."""
    if shipped is None or native_dtype(shipped, device):
        return "auto" if shipped is None else shipped
    kind, device = str(shipped).removeprefix("torch."), torch.device(device)
    where = (f"this CPU (torch CPU capability {torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu"
             else f"this {device.type} device")
    logger.warning(
        "%s ships in %s, which %s computes without hardware support (emulated, several times slower than "
        "float32); loading it in float32 — give --dtype %s (dtype=torch.%s) to run it in %s anyway",
        name, kind, where, kind, kind, kind,
    )
    return torch.float32
