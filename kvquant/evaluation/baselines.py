"""Classic quantizers for queries and keys, applied where kvquant's codebooks are (pure torch).

All take a post-RoPE tensor ``x`` of shape (B, H, T, D) and return its dequantized values in
``x``'s dtype. Scales are dynamic (computed from the tensor itself) and stored in fp16, and are
counted in the effective bits per entry:

``int{b}``          symmetric absmax INT per token: levels ``−(2^{b−1}−1)…(2^{b−1}−1)``,
                    scale = max_j |x[t, j]| / (2^{b−1}−1); bits ``b + 16/D``.
``int{b}-channel``  asymmetric min–max INT per channel over groups of G tokens (KIVI's key
                    layout): ``2^b`` levels between min and max; bits ``b + 32/G``.
``fp8``             e4m3 with a per-token scale absmax/448; bits ``8 + 16/D``.
``fp4``             e2m1 (±{0, ½, 1, 1½, 2, 3, 4, 6}) with a per-token scale absmax/6; bits ``4 + 16/D``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from kvquant.codebooks import Codebooks, SideBooks
from kvquant.core import scalar as cb

#: Tokens per group for per-channel scales (KIVI uses 32–128).
CHANNEL_GROUP = 128
SCALE_BITS = 16
_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP_MAX = {"fp8": 448.0, "fp4": 6.0}
_NAME = re.compile(r"^(int(?P<bits>[2-8])(?P<channel>-channel)?|fp8|fp4)$")


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected (B, H, T, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize NaN or infinite values")


def int_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric absmax INT with one scale per token (over the head dimension)."""
    _check(x)
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    return (torch.round(xf / scale).clamp(-qmax, qmax) * scale).to(x.dtype)


def int_per_channel(x: torch.Tensor, bits: int, group: int = CHANNEL_GROUP) -> torch.Tensor:
    """Asymmetric min–max INT with one (scale, zero) per channel per group of tokens."""
    _check(x)
    b, h, t, d = x.shape
    pad = (-t) % group
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad), mode="replicate") if pad else x.float()
    xg = xf.reshape(b, h, -1, group, d)
    lo, hi = xg.amin(3, keepdim=True), xg.amax(3, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    out = torch.round((xg - lo) / scale).clamp(0, 2**bits - 1) * scale + lo
    return out.reshape(b, h, -1, d)[:, :, :t].to(x.dtype)


def fp_per_token(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP8 (e4m3) or FP4 (e2m1) with one absmax scale per token, round to nearest."""
    _check(x)
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / _FP_MAX[fmt]).clamp_min(1e-12)
    y = xf / scale
    if fmt == "fp8":
        y = y.to(torch.float8_e4m3fn).float()
    else:
        grid = _FP4_GRID.to(y.device)
        mag = y.abs().contiguous()  # bucketize warns on (and copies) strided input
        idx = torch.bucketize(mag, 0.5 * (grid[1:] + grid[:-1]))
        y = torch.sign(y) * grid[idx]
    return (y * scale).to(x.dtype)


@dataclass(frozen=True)
class Baseline:
    """A named classic quantizer, the same for queries and keys and for every layer, applied to
    post-RoPE entries or (``rope="pre"``) to the entries before the rotary embedding."""

    name: str
    rope: str = "post"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"unknown baseline {self.name!r}; use int2..int8 (per-token absmax), "
                "int2-channel..int8-channel (per-channel min-max over groups of "
                f"{CHANNEL_GROUP} tokens), fp8 or fp4"
            )
        if self.rope not in ("post", "pre"):
            raise ValueError(f"rope must be 'post' or 'pre', got {self.rope!r}")

    @property
    def bits(self) -> int:
        m = _NAME.match(self.name)
        return int(m["bits"]) if m["bits"] else (8 if self.name == "fp8" else 4)

    def effective_bits(self, head_dim: int, seqlen: int | None = None) -> float:
        """Bits per entry including fp16 scales (and zero points for per-channel)."""
        if self.name.endswith("-channel"):
            return self.bits + 2 * SCALE_BITS / CHANNEL_GROUP
        return self.bits + SCALE_BITS / head_dim

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        if self.name.startswith("fp"):
            return fp_per_token(x, self.name)
        if self.name.endswith("-channel"):
            return int_per_channel(x, self.bits)
        return int_per_token(x, self.bits)


def is_baseline(name: str) -> bool:
    return bool(_NAME.match(name))


def kivi_codebooks(books: Codebooks, bits: float) -> Codebooks:
    """KIVI's key layout as :class:`kvquant.codebooks.Codebooks` for :func:`kvquant.cache.make_cache`:
    post-RoPE keys, asymmetric min–max INT per channel over ``books``' groups (the ``uniform``
    codebook: 2^bits evenly spaced levels including ±1), fp16 (mid, half), no sink, no
    allocation; only the geometry and group of ``books`` are used. ``bits`` an integer."""
    if bits != int(bits) or not 1 <= bits <= 8:
        raise ValueError(f"kivi@B takes integer key bits 1–8, got {bits:g}")
    bits = int(bits)
    config = replace(books.config, method="uniform", norm="channel-group", bits_q=bits, bits_k=bits, sink=0,
                     outliers=0.0, rope="post", budget=0.0, budget_sides="qk", scale_bits=16)
    book = cb.Codebook.nearest(np.linspace(-1.0, 1.0, 2**bits))

    def side(held: SideBooks) -> SideBooks:
        L, H, D = held.offset.shape
        table = lambda a: torch.from_numpy(a).float().expand(L, H, -1).contiguous()  # noqa: E731
        return SideBooks(bits, table(book.centers), table(book.boundaries), torch.zeros(L, H, D),
                         torch.ones(L, H, D), config.group, 0, 0.0, None, 16)

    return replace(books, config=config, q=side(books.q), k=side(books.k), hist=None)
