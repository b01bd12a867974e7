"""Streaming statistics of the (query, key) pairs that multiply inside ``Q·Kᵀ`` (torch only).

For a layer, query head h (keys from KV head ``h // g`` under GQA with g query heads per KV
head) and channel j, the pairs are ``(X, Y) = (q[t, j], k[s, j])`` for every *allowed*
(query t, key s): causal ``s ≤ t``, inside the sliding window where the layer has one, and
never a padded position. With the boolean pair mask ``M[t, s]``:

    n      = Σ_{t,s} M[t,s]                       (pairs per channel)
    Σq     = Σ_t n_t q[t,j],   Σq² = Σ_t n_t q[t,j]²,      n_t = Σ_s M[t,s]
    Σk     = Σ_s m_s k[s,j],   Σk² = Σ_s m_s k[s,j]²,      m_s = Σ_t M[t,s]
    Σqk    = Σ_t q[t,j] · (M k)[t,j]

Sums are float64, kept per (layer, query head, channel); chunks add up exactly (``merge``).
Moments per head pool the channels: each channel's pairs are pairs of the head.
Units: the activations' own (post-RoPE, before the softmax scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_SUMS = ("n", "sq", "sqq", "sk", "skk", "sqk")


@dataclass
class PairStats:
    """Float64 pair sums, each ``(L, H, D)``; ``absmax_q``/``absmax_k`` track the range seen."""

    n: torch.Tensor
    sq: torch.Tensor
    sqq: torch.Tensor
    sk: torch.Tensor
    skk: torch.Tensor
    sqk: torch.Tensor
    absmax_q: torch.Tensor
    absmax_k: torch.Tensor

    @classmethod
    def zeros(cls, layers: int, heads: int, head_dim: int) -> "PairStats":
        z = lambda: torch.zeros(layers, heads, head_dim, dtype=torch.float64)  # noqa: E731
        return cls(**{f.name: z() for f in fields(cls)})

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.n.shape)  # type: ignore[return-value]

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, pair_mask: torch.Tensor) -> None:
        """Add the pairs of one attention call.

        ``q``: (B, H, T, D) post-RoPE queries; ``k``: (B, H_kv, S, D) post-RoPE keys (not
        repeated); ``pair_mask``: bool (B or 1, 1, T, S), True where query t attends key s.
        """
        b, h, t, d = q.shape
        h_kv, s = k.shape[1], k.shape[2]
        if h % h_kv:
            raise ValueError(f"{h} query heads do not split over {h_kv} key heads")
        if pair_mask.shape[-2:] != (t, s) or pair_mask.dtype != torch.bool:
            raise ValueError(f"pair_mask must be bool (.., {t}, {s}), got {pair_mask.dtype} {tuple(pair_mask.shape)}")
        if pair_mask.shape[1] != 1:
            raise ValueError("pair_mask must be shared by all heads (B, 1, T, S)")
        g = h // h_kv
        m = pair_mask.expand(b, 1, t, s).to(torch.float64)
        q64, k64 = q.to(torch.float64), k.to(torch.float64)
        n_t = m.sum(-1, keepdim=True).expand(b, 1, t, 1)  # keys per query
        m_s = m.sum(-2).unsqueeze(-1).expand(b, 1, s, 1)  # queries per key
        mk = torch.matmul(m, k64).repeat_interleave(g, dim=1)  # (B, H, T, D)
        k_w = (m_s * k64).sum(dim=(0, 2))  # (H_kv, D)
        k_ww = (m_s * k64 * k64).sum(dim=(0, 2))
        self.n[layer] += n_t.sum()
        self.sq[layer] += (n_t * q64).sum(dim=(0, 2))
        self.sqq[layer] += (n_t * q64 * q64).sum(dim=(0, 2))
        self.sk[layer] += k_w.repeat_interleave(g, dim=0)
        self.skk[layer] += k_ww.repeat_interleave(g, dim=0)
        self.sqk[layer] += (q64 * mk).sum(dim=(0, 2))
        # ranges over the entries that take part in some pair (not padded or never-attended positions)
        q_abs = torch.where(n_t > 0, q64.abs(), 0.0).amax(dim=(0, 2))
        self.absmax_q[layer] = torch.maximum(self.absmax_q[layer], q_abs)
        k_abs = torch.where(m_s > 0, k64.abs(), 0.0).amax(dim=(0, 2)).repeat_interleave(g, dim=0)
        self.absmax_k[layer] = torch.maximum(self.absmax_k[layer], k_abs)

    def merge(self, other: "PairStats") -> "PairStats":
        """Sum of two accumulators (e.g. from two batches or devices)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge stats of shape {other.shape} into {self.shape}")
        out = {name: getattr(self, name) + getattr(other, name) for name in _SUMS}
        out["absmax_q"] = torch.maximum(self.absmax_q, other.absmax_q)
        out["absmax_k"] = torch.maximum(self.absmax_k, other.absmax_k)
        return PairStats(**out)

    def head_moments(self) -> "HeadMoments":
        """Per (layer, query head) moments, channels pooled."""
        return HeadMoments.from_sums(*(getattr(self, k).sum(-1) for k in _SUMS))

    def channel_moments(self) -> "HeadMoments":
        """Per (layer, query head, channel) moments."""
        return HeadMoments.from_sums(*(getattr(self, k) for k in _SUMS))

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "PairStats":
        return cls(**{f.name: d[f.name].to(torch.float64) for f in fields(cls)})


@dataclass(frozen=True)
class HeadMoments:
    """Means, σ (population) and correlation ρ of X = q and Y = k over the multiplying pairs."""

    mean_q: torch.Tensor
    mean_k: torch.Tensor
    sigma_q: torch.Tensor
    sigma_k: torch.Tensor
    rho: torch.Tensor
    pairs: torch.Tensor

    @classmethod
    def from_sums(cls, n, sq, sqq, sk, skk, sqk) -> "HeadMoments":
        if torch.any(n <= 0):
            raise ValueError("no pairs were seen for some heads: calibrate on at least one window")
        mq, mk = sq / n, sk / n
        vq = (sqq / n - mq * mq).clamp_min(0)
        vk = (skk / n - mk * mk).clamp_min(0)
        sq_, sk_ = vq.sqrt(), vk.sqrt()
        cov = sqk / n - mq * mk
        rho = (cov / (sq_ * sk_).clamp_min(1e-300)).clamp(-1, 1)
        return cls(mq, mk, sq_, sk_, rho, n)


def gqa_pooled_rho(sigma_q: torch.Tensor, rho: torch.Tensor, groups: int) -> torch.Tensor:
    """Effective ρ of each key head against its g query heads (docs/theory.md §4, GQA).

    ``ρ_eff² = Σ_g σ_{X,g}² ρ_g² / Σ_g σ_{X,g}²``, sign of ``Σ_g σ_{X,g}² ρ_g``.
    ``sigma_q``, ``rho``: (…, H) with query heads of one key head adjacent; returns (…, H / g).
    """
    w = (sigma_q**2).unflatten(-1, (-1, groups))
    r = rho.unflatten(-1, (-1, groups))
    mag = ((w * r * r).sum(-1) / w.sum(-1).clamp_min(1e-300)).sqrt()
    return torch.where((w * r).sum(-1) < 0, -mag, mag)
