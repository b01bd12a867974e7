"""Dynamic normalisation per channel over groups of tokens, and the calibration histograms
that give codebooks their shape in those units (torch only).

For x (B, H, T, D) and group size G, each (channel j, group of G consecutive tokens) gets
``mid = (max + min)/2`` and ``half = (max − min)/2`` (fp16 each: 32 bits per group and channel),
and ``x̃ = (x − mid) / half ∈ [−1, 1]``. The first ``sink`` tokens (attention sinks) are kept
exact and excluded from the groups. A codebook on [−1, 1] then quantizes x̃; with K evenly
spaced centers including ±1 this is exactly asymmetric min–max INT per channel (KIVI's keys).

The shape of the codebook comes from calibration: :class:`GroupHistogram` accumulates, per
layer and head, the distribution of x̃ on a fine grid, weighted by what an error in x costs in
``Q·Kᵀ`` (first order): ``half² · E[Y² | this entry]``, where Y runs over the entry's partners
(the keys s ≤ t a query entry multiplies, or the queries a key entry meets, summed over the g
query heads of a KV head). The optimal density on the grid is then ``λ ∝ (f · w)^{1/3}``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: Grid points of the histograms on [−1, 1] (nodes at −1 + 2i/N, so ±1 are nodes).
HIST_BINS = 1024


def group_minmax(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x̃, mid, half)``: x̃ like x (float32) in [−1, 1]; mid/half (B, H, ⌈T/G⌉, 1, D).

    A channel constant over its group (half = 0) maps to x̃ = 0 and is reconstructed exactly.
    """
    b, h, t, d = x.shape
    pad = (-t) % group
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad), mode="replicate")
    xg = xf.reshape(b, h, -1, group, d)
    lo, hi = xg.amin(3, keepdim=True), xg.amax(3, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    xt = torch.where(half > 0, (xg - mid) / torch.where(half > 0, half, 1.0), 0.0)
    return xt.reshape(b, h, -1, d)[:, :, :t], mid, half


def group_restore(xt: torch.Tensor, mid: torch.Tensor, half: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`group_minmax` (same ``group``) for (quantized) x̃ (B, H, T, D)."""
    b, h, t, d = xt.shape
    pad = mid.shape[2] * group - t
    xg = torch.nn.functional.pad(xt, (0, 0, 0, pad)).reshape(b, h, -1, group, d)
    return (xg * half + mid).reshape(b, h, -1, d)[:, :, :t]


def hist_index(xt: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Nearest grid node of x̃ ∈ [−1, 1]: integer in [0, bins]."""
    return torch.round((xt.clamp(-1, 1) + 1) * (bins / 2)).long()


@dataclass
class GroupHistogram:
    """Float64 histograms of x̃ per (layer, head): ``count`` (entries) and ``weight``
    (Σ half² · E[partner² | entry]), for queries (L, H, N+1) and keys (L, H_kv, N+1)."""

    count_q: torch.Tensor
    weight_q: torch.Tensor
    count_k: torch.Tensor
    weight_k: torch.Tensor
    group: int
    sink: int

    @classmethod
    def zeros(cls, layers: int, heads: int, kv_heads: int, group: int, sink: int, bins: int = HIST_BINS):
        zq = lambda: torch.zeros(layers, heads, bins + 1, dtype=torch.float64)  # noqa: E731
        zk = lambda: torch.zeros(layers, kv_heads, bins + 1, dtype=torch.float64)  # noqa: E731
        return cls(zq(), zq(), zk(), zk(), group, sink)

    @property
    def nodes(self) -> torch.Tensor:
        n = self.count_q.shape[-1] - 1
        return torch.linspace(-1.0, 1.0, n + 1, dtype=torch.float64)

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, pair_mask: torch.Tensor) -> None:
        """Add one attention call: q (B, H, T, D), k (B, H_kv, S, D), pair_mask bool (B|1, 1, T, S)."""
        b, h, t, d = q.shape
        h_kv, s = k.shape[1], k.shape[2]
        g = h // h_kv
        m = pair_mask.expand(b, 1, t, s).to(torch.float32)
        q32, k32 = q.float(), k.float()
        n_t = m.sum(-1).unsqueeze(-1).clamp_min(1)  # (B, 1, T, 1)
        m_s = m.sum(-2).unsqueeze(-1).clamp_min(1)  # (B, 1, S, 1)
        partner_q = (m @ (k32 * k32)).repeat_interleave(g, 1) / n_t  # E[k² | query entry]
        q2 = (q32 * q32).unflatten(1, (h_kv, g)).sum(2)  # Σ over the KV head's queries
        partner_k = m.transpose(-1, -2) @ q2 / m_s  # E[Σ_g q² | key entry]
        ns = self.sink
        for name, x, partner, heads in (("q", q32, partner_q, h), ("k", k32, partner_k, h_kv)):
            x, partner = x[:, :, ns:], partner[:, :, ns:]
            if x.shape[2] == 0:
                continue
            xt, _, half = group_minmax(x, self.group)
            half_full = half.expand(-1, -1, -1, self.group, -1).reshape(b, heads, -1, d)[:, :, : x.shape[2]]
            w = (half_full**2 * partner).double()
            nb = self.count_q.shape[-1]
            idx = hist_index(xt, nb - 1) + nb * torch.arange(heads, device=x.device)[None, :, None, None]
            cnt = torch.bincount(idx.flatten(), minlength=heads * nb).reshape(heads, nb).double().cpu()
            wsum = torch.bincount(idx.flatten(), weights=w.flatten(), minlength=heads * nb).reshape(heads, nb).cpu()
            getattr(self, f"count_{name}")[layer] += cnt
            getattr(self, f"weight_{name}")[layer] += wsum

    def to_dict(self) -> dict[str, torch.Tensor]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("group", "sink")}
        out["group_sink"] = torch.tensor([self.group, self.sink])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "GroupHistogram":
        group, sink = (int(v) for v in d["group_sink"])
        return cls(d["count_q"], d["weight_q"], d["count_k"], d["weight_k"], group, sink)
