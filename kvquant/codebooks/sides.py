"""One side's codebooks (queries or keys) for every layer and head, and applying them to activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant.core import scalar as cb
from kvquant.core.groupnorm import (
    causal_groups,
    group_restore,
    group_split,
)
from kvquant.core.packing import level_bits
from kvquant.core.quantizer import (
    channel_codes,
    channel_values,
    decode_groups,
    encode_groups,
)


@dataclass
class SideBooks:
    """Codebooks of one side (queries or keys): centers (L, H, K), boundaries (L, H, K−1),
    offset and scale (L, H, D) in the activations' units.

    With bit allocation, ``channel_levels`` (L, H, D) gives each channel its number of levels
    (2, 3, 4, 5, 8, …, ≤ 2^bits; 3 and 5 pack at 1.6 and 2.33 bits, :data:`kvquant.core.packing.LEVEL_PACKING`;
    transform-coded queries also 1: 0 bits, the component decoded as its mean, center 0)
    and every channel has its own table: centers (L, H, D, K), boundaries (L, H, D, K−1),
    K = 2^bits; a channel with n levels uses its head's n-level codebook, its boundaries padded
    with +inf (codes never reach the padding) and its centers with its last center.

    Transform coding (static mode, queries: ``Codebooks.causal_queries(norm="klt")``): with
    ``basis`` V (L, H, D, D), orthonormal columns, and ``basis_sd`` s (L, H, D), a token's
    normalised entries x̃ = (x − offset)/scale are coded as the components y = (x̃ V)/s — the
    tables, the levels and the token scale apply to y's entries in place of x̃'s channels — and
    restored as x̂ = ((ŷ ∘ s) Vᵀ) ∘ scale + offset."""

    bits: int
    centers: torch.Tensor
    boundaries: torch.Tensor
    offset: torch.Tensor
    scale: torch.Tensor
    group: int = 0  # > 0: dynamic min–max per channel over groups of this many tokens
    sink: int = 0  # first tokens kept exact
    outliers: float = 0.0  # group mode: fraction of each (group × D) block kept exact
    channel_levels: torch.Tensor | None = None  # (L, H, D) int: allocated levels per channel (None: all 2^bits)
    scale_bits: int = 16  # group mode: bits of each stored mid / half
    token_scale: bool = False  # static mode: one fp16 scale per token and head (norm "channel-token")
    # token_scale: the |x̃| a token's largest entry is mapped onto, (L, H); None: the outermost center
    # of the head's table (allocated static books give the head's 2^b-level codebook's)
    token_range: torch.Tensor | None = None
    basis: torch.Tensor | None = None  # (L, H, D, D): static mode, components y = (x̃ V) / basis_sd
    basis_sd: torch.Tensor | None = None  # (L, H, D)

    def __post_init__(self) -> None:
        if (self.basis is None) != (self.basis_sd is None):
            raise ValueError("basis and basis_sd come together (transform coding) or not at all")
        if self.basis is not None and self.group:
            raise ValueError("a basis (transform coding) needs static normalisation (group = 0)")

    @property
    def mean_bits(self) -> float:
        """Code bits per entry averaged over this side's channels, heads and layers (packed sizes)."""
        if self.channel_levels is None:
            return self.bits
        levels, counts = self.channel_levels.unique(return_counts=True)
        return sum(level_bits(int(n)) * int(c) for n, c in zip(levels, counts)) / self.channel_levels.numel()

    def apply(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Quantize-dequantize ``x`` (B, H, T, D), tokens from position 0, with layer ``layer``'s
        codebooks. The first ``sink`` tokens stay exact; in group mode only complete groups are
        quantized (:func:`kvquant.core.groupnorm.causal_groups`: what a KV cache holds after these T
        tokens), the newest incomplete group stays exact."""
        self._check_shape(x)
        if self.group:
            xs = causal_groups(x, self.group, self.sink)
            if xs.shape[2] == 0:
                return x
            out = self._apply_groups(xs, layer)
            return torch.cat([x[:, :, : self.sink], out[:, :, self.sink :], x[:, :, xs.shape[2] :]], dim=2)
        if self.sink:
            n = min(self.sink, x.shape[2])
            if n == x.shape[2]:
                return x
            return torch.cat([x[:, :, :n], self._apply_static(x[:, :, n:], layer)], dim=2)
        return self._apply_static(x, layer)

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.centers.shape[1] or x.shape[-1] != self.offset.shape[-1]:
            raise ValueError(
                f"tensor has {x.shape[1]} heads × {x.shape[-1]} dims, codebooks are for "
                f"{self.centers.shape[1]} × {self.offset.shape[-1]}"
            )

    def _apply_groups(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Whole groups of x (B, H, n·G, D) through min–max per channel and group and the tables."""
        centers, bounds = self.centers[layer].to(x.device), self.boundaries[layer].to(x.device)
        if self.outliers:
            xt, mid, half, exact = group_split(x, self.group, self.outliers, self.scale_bits)
            out = group_restore(fake_quantize_rows(xt, centers, bounds), mid, half, self.group)
            return torch.where(exact, x.float(), out).to(x.dtype)
        q = encode_groups(x, self.group, self.scale_bits, bounds)  # the KV cache's quantizer
        return decode_groups(q, centers, self.group).to(x.dtype)

    def _apply_static(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        dev = x.device
        centers, bounds = self.centers[layer].to(dev), self.boundaries[layer].to(dev)
        off = self.offset[layer].to(dev)[None, :, None, :]
        sc = self.scale[layer].to(dev)[None, :, None, :]
        xn = (x.float() - off) / sc
        if self.basis is not None:  # the components y = (x̃ V) / s take the channels' place
            basis, sd = self.basis[layer].to(dev), self.basis_sd[layer].to(dev)[None, :, None, :]
            xn = torch.einsum("bhtd,hde->bhte", xn, basis) / sd
        if self.token_scale:  # one fp16 scale per token and head: the token's largest |x̃| onto the head's range
            top = (centers.abs().flatten(1).amax(-1) if self.token_range is None else self.token_range[layer].to(dev))
            a = xn.abs()
            if self.channel_levels is not None:  # a 1-level (dropped) component takes no part in the range
                a = a * (self.channel_levels[layer].to(dev) > 1)[None, :, None, :]
            r = (a.amax(-1, keepdim=True) / top[None, :, None, None]).clamp_min(torch.finfo(torch.float16).tiny)
            r = r.half().float()
            out = fake_quantize_rows(xn / r, centers, bounds) * r
        else:
            out = fake_quantize_rows(xn, centers, bounds)
        if self.basis is not None:
            out = torch.einsum("bhte,hde->bhtd", out * sd, basis)
        return (out * sc + off).to(x.dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = ("centers", "boundaries", "offset", "scale") + tuple(
            k for k in ("channel_levels", "token_range", "basis", "basis_sd") if getattr(self, k) is not None)
        return {f"{prefix}.{k}": getattr(self, k).contiguous() for k in names}


def fake_quantize_rows(xt: torch.Tensor, centers: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """x̃ (B, H, T, D) through one layer's tables: per head (H, K) or per channel (H, D, K)."""
    return channel_values(channel_codes(xt, bounds), centers)
