"""Dynamic normalisation per channel over groups of tokens, and the calibration histograms
that give codebooks their shape in those units (torch only).

For x (B, H, T, D) and group size G, each (channel j, group of G consecutive tokens) gets
``mid = (max + min)/2`` and ``half = (max − min)/2`` (stored in fp16 or 8 bits each: 32 or 16
bits per group and channel, :func:`store_scales`),
and ``x̃ = (x − mid) / half ∈ [−1, 1]``. Groups are aligned at token 0 and **causal**
(:func:`causal_groups`): only complete groups are quantized — the newest incomplete one stays
exact, as in a KV cache that cannot know the rest of the group yet — and the first ``sink``
tokens (attention sinks, ``sink < G``) stay exact and are left out of their group's range. A codebook on [−1, 1] then quantizes x̃; with K evenly
spaced centers including ±1 this is exactly asymmetric min–max INT per channel (KIVI's keys).

**Dense-and-sparse outliers** (``outliers = p > 0``, :func:`group_split`): in every (batch, head,
group) block of G×D entries the ``⌈p·G·D⌉`` entries that stick out most from their own channel
are kept exact (fp16 value + position) and the min–max of each channel is taken over the rest
only, so one huge entry no longer stretches its channel's grid for the other G−1 tokens.

The shape of the codebook comes from calibration: :class:`GroupHistogram` accumulates, per
layer and head, the distribution of x̃ on a fine grid, weighted by what an error in x costs in
``Q·Kᵀ`` (first order): ``half² · E[Y² | this entry]``, where Y runs over the entry's partners
(the keys s ≤ t a query entry multiplies, or the queries a key entry meets, summed over the g
query heads of a KV head). The optimal density on the grid is then ``λ ∝ (f · w)^{1/3}``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

#: Grid points of the histograms on [−1, 1] (nodes at −1 + 2i/N, so ±1 are nodes).
HIST_BINS = 1024


#: Bits per stored group scale value (mid and half each): fp16, or the 8-bit code of :func:`code_scales`.
SCALE_BITS = (16, 8)


#: Largest finite fp16 value: 16-bit group scales are stored as fp16, clamped to it.
_FP16_MAX = 65504.0
#: 8-bit half-range exponent that stores a zero range (a channel constant 0 over its group).
_ZERO_EXPONENT = -128


@functools.lru_cache(maxsize=8)
def _exp2_table(device: str) -> torch.Tensor:
    """``2^(e/8)`` for every 8-bit exponent e in [−128, 127], float32, computed once: a lookup gives
    the same bits whatever the shape of the tensor it serves (a vectorised exp2 can differ from the
    scalar one in the last bit, which would make the cache's values depend on the batch layout)."""
    return torch.exp2(torch.arange(-128, 128, dtype=torch.float32) / 8).to(device)


def _half_range(e: torch.Tensor) -> torch.Tensor:
    """``2^(e/8)`` of integer-valued exponents ``e`` (any dtype) from :func:`_exp2_table`."""
    return _exp2_table(str(e.device))[e.long() + 128]


def store_scales(mid: torch.Tensor, half: torch.Tensor, scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ``(mid, half)`` as stored: fp16 (``scale_bits=16``, clamped to ±65504), or the int8
    codes ``(m, e)`` of the 8-bit format (``scale_bits=8``):

    ``half → 2^(e/8)`` with ``e = ⌈8·log2 max(half, 16·|mid|/127)⌉`` (never below half, steps of
    9 %); ``mid → m · 2^(e/8)/16`` with ``m = round(16 · mid / 2^(e/8))`` (|m| ≤ 127 by the choice
    of e, error ≤ half_q/32). A channel whose offset exceeds 127/16 of its half-range (rare in real
    q and k) gets a wider half-range instead of a wrong offset. ``e = −128`` stores a zero range
    and zero mid (a channel that is 0 over its group, or within 2^−16 of it)."""
    if scale_bits == 16:
        return mid.clamp(-_FP16_MAX, _FP16_MAX).half(), half.clamp(0, _FP16_MAX).half()
    if scale_bits != 8:
        raise ValueError(f"scale_bits must be one of {SCALE_BITS}, got {scale_bits!r}")
    need = torch.maximum(half, mid.abs() * (16 / 127))
    e = torch.ceil(8 * torch.log2(need.clamp_min(2.0**-16))).clamp(_ZERO_EXPONENT, 127)
    e = torch.where(need > 2.0**-16, e, _ZERO_EXPONENT)
    step = torch.where(e > _ZERO_EXPONENT, _half_range(e) / 16, 1.0)
    m = torch.where(e > _ZERO_EXPONENT, torch.round(mid / step).clamp(-127, 127), 0.0)
    return m.to(torch.int8), e.to(torch.int8)


def load_scales(mid_s: torch.Tensor, half_s: torch.Tensor, scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`store_scales`: float32 ``(mid, half)`` from their stored form."""
    if scale_bits == 16:
        return mid_s.float(), half_s.float()
    half = torch.where(half_s > _ZERO_EXPONENT, _half_range(half_s), 0.0)
    return mid_s.float() * half / 16, half


def code_scales(mid: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mid, half)`` as the 8-bit format stores them (:func:`store_scales`), back in float32."""
    return load_scales(*store_scales(mid, half, 8), 8)


def _normalise(xg: torch.Tensor, mid: torch.Tensor, half: torch.Tensor, scale_bits: int):
    """``(x̃, mid, half)`` for grouped x (B, H, n, G, D) and its min–max (mid, half), the scales
    as stored (:func:`store_scales` — fp16, or the 8-bit codes — and read back): what the KV
    cache stores is what the simulation and calibration use."""
    mid, half = load_scales(*store_scales(mid, half, scale_bits), scale_bits)
    return scaled(xg, mid, half), mid, half


def scaled(xg: torch.Tensor, mid: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """``x̃ = (x − mid) / half`` for grouped x (B, H, n, G, D); 0 where a channel's half-range is 0."""
    return torch.where(half > 0, (xg - mid) / torch.where(half > 0, half, 1.0), 0.0)


def group_minmax(x: torch.Tensor, group: int, scale_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x̃, mid, half)``: x̃ like x (float32) in [−1, 1]; mid/half (B, H, ⌈T/G⌉, 1, D).

    A channel constant over its group (half = 0) maps to x̃ = 0 and is reconstructed exactly.
    mid and half as stored (fp16, or the 8-bit codes of :func:`code_scales`; x̃ may then reach
    slightly past ±1: ±(1 + 1/32) with 8 bits).
    """
    b, h, t, d = x.shape
    xg, mid, half = group_range(x, group)
    xt, mid, half = _normalise(xg, mid, half, scale_bits)
    return xt.reshape(b, h, -1, d)[:, :, :t], mid, half


def group_range(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xg, mid, half)``: x (B, H, T, D) as float32 groups (B, H, ⌈T/G⌉, G, D) (a partial last
    group padded by repeating its last token) and each channel's min–max ``mid = (max+min)/2``,
    ``half = (max−min)/2`` (B, H, ⌈T/G⌉, 1, D), unrounded."""
    b, h, t, d = x.shape
    pad = (-t) % group
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad), mode="replicate")
    xg = xf.reshape(b, h, -1, group, d)
    lo, hi = xg.amin(3, keepdim=True), xg.amax(3, keepdim=True)
    return xg, (hi + lo) / 2, (hi - lo) / 2


def complete_tokens(t: int, group: int) -> int:
    """Tokens of a sequence of ``t`` that lie in complete groups of ``group`` aligned at token 0."""
    return t // group * group


def causal_groups(x: torch.Tensor, group: int, sink: int) -> torch.Tensor:
    """The part of x (B, H, T, D) that the group quantizer quantizes: tokens ``[0, n)``, n =
    :func:`complete_tokens`, with the ``sink`` first tokens replaced by a copy of token ``sink``
    so that they do not widen group 0's range (their codes are placeholders: callers keep them
    exact). The tokens ``[n, T)`` of the newest incomplete group stay exact."""
    n = complete_tokens(x.shape[2], group)
    xs = x[:, :, :n]
    if sink and n:
        if sink >= group:
            raise ValueError(f"sink ({sink}) must be smaller than group ({group}): sinks are kept inside group 0")
        xs = torch.cat([xs[:, :, sink : sink + 1].expand(-1, -1, sink, -1), xs[:, :, sink:]], dim=2)
    return xs


def outlier_count(p: float, entries: int) -> int:
    """``⌈p · entries⌉``: entries kept exact in a block (rounded first, so 0.25·16 is 4, not 5)."""
    return math.ceil(round(p * entries, 9)) if p > 0 else 0


def check_finite(x: torch.Tensor) -> None:
    """Raise ValueError on NaN/inf, as :func:`kvquant.core.scalar.quantize` does for static scales."""
    if x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():  # NaN propagates to min/max
        raise ValueError("cannot quantize NaN or infinite values")


def group_split(
    x: torch.Tensor, group: int, outliers: float, scale_bits: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense-and-sparse :func:`group_minmax`: ``(x̃, mid, half, exact)``, ``exact`` a bool mask
    like x of the entries kept exact (x̃ = 0 there); mid/half are the min–max of the others.

    Blocks are (batch, head, group of ``group`` tokens) × all D channels; a block of n tokens (the
    last one may be partial) keeps ``⌈outliers · n · D⌉`` entries exact. **Score** of an entry:
    ``|x − median| / MAD`` over its channel in its group (∞ where MAD = 0 and x ≠ median). Why
    relative to the channel: with min–max per channel, a channel's grid step — hence the error of
    all its G entries — is set by its own range, so what an entry costs is how far it stretches
    that range beyond the channel's bulk, in units of the channel's spread; the median and MAD
    are not moved by the outliers themselves (mean/σ would be), and scoring by |x̃| after a first
    min–max would not work: every channel has entries at exactly ±1 (its min and max), so the
    ordinary extremes of 2·D channels would tie with real outliers. ``outliers = 0`` is
    :func:`group_minmax` (plus an all-False mask). Non-finite x: ValueError.
    """
    check_finite(x)
    b, h, t, d = x.shape
    if outliers <= 0:
        xt, mid, half = group_minmax(x, group, scale_bits)
        return xt, mid, half, torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    pad = (-t) % group
    xf = x.float()
    if pad:  # padding is NaN: ignored by the medians, never an outlier, not in the min–max
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad), value=float("nan"))
    n = xf.shape[2] // group
    xg = xf.reshape(b, h, n, group, d)
    padded = torch.isnan(xg)
    xc = xg.transpose(3, 4).contiguous()  # (B, H, n, D, G): medians along the last dim are faster
    dev = (xc - xc.nanmedian(-1, keepdim=True).values).abs()
    mad = dev.nanmedian(-1, keepdim=True).values
    dev, mad = dev.transpose(3, 4), mad.transpose(3, 4)
    inf = torch.tensor(float("inf"), device=x.device)
    score = torch.where(mad > 0, dev / torch.where(mad > 0, mad, 1.0), torch.where(dev > 0, inf, 0.0))
    score = torch.where(padded, -inf, score).reshape(b, h, n, group * d)
    k = outlier_count(outliers, group * d)
    top = score.topk(k, dim=-1).indices  # sorted by score, largest first
    keep = torch.full((n, k), True, device=x.device)
    if pad:  # the partial last block keeps fewer
        keep[-1, outlier_count(outliers, (group - pad) * d):] = False
    exact = torch.zeros(b, h, n, group * d, dtype=torch.bool, device=x.device)
    exact.scatter_(-1, top, keep.expand(b, h, n, k))
    exact = exact.reshape(b, h, n, group, d)
    out = exact | padded
    lo = torch.where(out, inf, xg).amin(3, keepdim=True)
    hi = torch.where(out, -inf, xg).amax(3, keepdim=True)
    empty = lo > hi  # every entry of the channel is exact in this group
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    xt, mid, half = _normalise(xg, (hi + lo) / 2, (hi - lo) / 2, scale_bits)
    xt = torch.where(out, 0.0, xt)
    return xt.reshape(b, h, -1, d)[:, :, :t], mid, half, exact.reshape(b, h, -1, d)[:, :, :t]


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
    (Σ half² · E[partner² | entry]), for queries (L, H, N+1) and keys (L, H_kv, N+1).

    Optionally ``fisher`` (Σ half² · (∂loss/∂x)²; :meth:`update_grad`): the empirical
    diagonal-Fisher weight of an entry, so that ``½ Σ fisher · (x̃ − Q(x̃))²`` is the second-order
    estimate of the increase of the calibration loss (each batch's mean next-token NLL, summed
    over the batches) that the codebook's error causes — one scale for every layer, head and
    side, which is what bit allocation compares. ``channel_fisher`` (L, H, D) holds the same
    weights summed per channel instead of per x̃ bin: bit allocation gives levels channel by
    channel, and a channel's loss increase at b bits is estimated as its Fisher total times its
    head's Fisher-weighted mean (x̃ − Q_b(x̃))².

    With Fisher weights, ``gram_q`` (L, H, D+1, D+1) also holds each query head's Gram matrix of
    the augmented query [q, 1] (raw units, the same tokens as the histograms): Σ q qᵀ in
    ``[:D, :D]``, Σ q in ``[:D, D]`` and the token count in ``[D, D]`` — the second moments that
    transform coding of causal queries (:meth:`kvquant.codebooks.Codebooks.causal_queries`, ``klt``)
    needs, about whatever per-channel offset it normalises with.

    Captured with the quantizer's own settings (:func:`causal_groups`): ``group`` tokens per
    scale aligned at token 0, the first ``sink`` tokens and the incomplete last group left out, and with ``outliers`` > 0 the entries :func:`group_split` keeps exact left
    out too (x̃ and half of the others are those of the reduced min–max)."""

    count_q: torch.Tensor
    weight_q: torch.Tensor
    count_k: torch.Tensor
    weight_k: torch.Tensor
    group: int
    sink: int
    outliers: float = 0.0
    fisher_q: torch.Tensor | None = None
    fisher_k: torch.Tensor | None = None
    scale_bits: int = 16
    channel_fisher_q: torch.Tensor | None = None
    channel_fisher_k: torch.Tensor | None = None
    gram_q: torch.Tensor | None = None

    @classmethod
    def zeros(cls, layers: int, heads: int, kv_heads: int, group: int, sink: int, outliers: float = 0.0,
              bins: int = HIST_BINS, fisher: bool = False, scale_bits: int = 16, head_dim: int = 0):
        """Empty histograms; ``fisher=True`` (Fisher weights, for bit allocation) needs ``head_dim``."""
        z = lambda *shape: torch.zeros(layers, *shape, dtype=torch.float64)  # noqa: E731
        out = cls(z(heads, bins + 1), z(heads, bins + 1), z(kv_heads, bins + 1), z(kv_heads, bins + 1), group, sink,
                  float(outliers), scale_bits=int(scale_bits))
        if fisher:
            if head_dim < 1:
                raise ValueError("Fisher weights are also kept per channel: GroupHistogram.zeros(fisher=True) needs head_dim")
            out.fisher_q, out.fisher_k = z(heads, bins + 1), z(kv_heads, bins + 1)
            out.channel_fisher_q, out.channel_fisher_k = z(heads, head_dim), z(kv_heads, head_dim)
            out.gram_q = z(heads, head_dim + 1, head_dim + 1)
        return out

    @property
    def key(self) -> tuple[int, int, float, int]:
        """``(group, sink, outliers, scale_bits)``: the settings a codebook built from it must have."""
        return self.group, self.sink, self.outliers, self.scale_bits

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
        for name, x, partner in (("q", q32, partner_q), ("k", k32, partner_k)):
            self._add(layer, x, partner, f"weight_{name}", f"count_{name}")
        if self.gram_q is not None:
            xs = causal_groups(q, self.group, self.sink)[:, :, self.sink :].double()
            aug = torch.cat([xs, torch.ones_like(xs[..., :1])], dim=-1)  # [q, 1]
            self.gram_q[layer] += torch.einsum("bhtd,bhte->hde", aug, aug).cpu()

    def update_grad(self, layer: int, side: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Add Fisher weights ``half² · grad²`` of one attention input: ``side`` "q" or "k", x and
        ``grad = ∂loss/∂x`` (B, H, T, D) (a :data:`kvquant.hf.attention.GradObserver`)."""
        if self.fisher_q is None:
            raise ValueError("this histogram was made without Fisher weights (GroupHistogram.zeros(fisher=True))")
        self._add(layer, x.float(), grad.float() ** 2, f"fisher_{side}", channel=f"channel_fisher_{side}")

    def _add(self, layer: int, x: torch.Tensor, per_entry: torch.Tensor, weight: str, count: str | None = None,
             channel: str | None = None) -> None:
        """Bin x (B, H, T, D) by x̃ and add ``half² · per_entry`` to histogram ``weight`` (and the
        number of entries to ``count``), both (L, H, N+1), and summed per channel to ``channel``
        (L, H, D); sinks and exact outliers left out."""
        ns = self.sink
        x = causal_groups(x, self.group, ns)
        if x.shape[2] <= ns:
            return
        b, heads, t, d = x.shape
        if self.outliers:
            xt, _, half, exact = group_split(x, self.group, self.outliers, self.scale_bits)
            exact = exact[:, :, ns:]
        else:
            xt, _, half = group_minmax(x, self.group, self.scale_bits)
        half_full = half.expand(-1, -1, -1, self.group, -1).reshape(b, heads, -1, d)[:, :, ns:]
        xt, per_entry = xt[:, :, ns:], per_entry[:, :, ns:t]
        w = (half_full**2 * per_entry).double()
        dense = (~exact).double() if self.outliers else None  # exact entries are not quantized
        if dense is not None:
            w = w * dense
        if channel is not None:
            getattr(self, channel)[layer] += w.sum((0, 2)).cpu()
        nb = self.count_q.shape[-1]
        idx = (hist_index(xt, nb - 1) + nb * torch.arange(heads, device=x.device)[None, :, None, None]).flatten()

        def add(name: str, weights: torch.Tensor | None) -> None:
            total = torch.bincount(idx, weights=weights, minlength=heads * nb).double()
            getattr(self, name)[layer] += total.reshape(heads, nb).cpu()

        if count is not None:
            add(count, None if dense is None else dense.flatten())
        add(weight, w.flatten())

    def to_dict(self) -> dict[str, torch.Tensor]:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("group", "sink", "outliers", "scale_bits") and getattr(self, f.name) is not None}
        out["group_sink"] = torch.tensor([self.group, self.sink])
        out["outliers"] = torch.tensor([self.outliers], dtype=torch.float64)
        out["scale_bits"] = torch.tensor([self.scale_bits])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "GroupHistogram":
        """Inverse of :meth:`to_dict`; files from before outliers existed load with outliers = 0."""
        group, sink = (int(v) for v in d["group_sink"])
        outliers = float(d["outliers"][0]) if "outliers" in d else 0.0
        scale_bits = int(d["scale_bits"][0]) if "scale_bits" in d else 16
        return cls(d["count_q"], d["weight_q"], d["count_k"], d["weight_k"], group, sink, outliers,
                   d.get("fisher_q"), d.get("fisher_k"), scale_bits, d.get("channel_fisher_q"), d.get("channel_fisher_k"),
                   d.get("gram_q"))
