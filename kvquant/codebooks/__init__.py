"""A model's codebooks: one per (layer, query head) and per (layer, KV head), saved with their
statistics, configuration and model fingerprint in one safetensors file.

Normalisation (static, from calibration), per head or per channel:
``x̃ = (x − offset) / scale`` with offset = mean and scale = σ of x over the multiplying pairs;
the codebook quantizes x̃ (its centers are in σ units) and ``x̂ = offset + scale · center``.
Static scales and tables are per model, not per token, so the effective bits per entry are
exactly the codebook bits. ``channel-token`` adds one scale per token and head on top of the
per-channel normalisation: ``r = max_j |x̃_j| / c_max`` (stored in fp16, +16/D bits per entry;
``c_max`` the codebook's outermost center), and the codebook quantizes ``x̃ / r`` — no entry of
any token is clipped, and each token is quantized from itself alone (a causal rule for queries,
:meth:`Codebooks.causal_queries`).

Codebooks come from the Gaussian pair model fitted to the calibration statistics:
query head h uses ``(ρ_h, μ_Q/σ_Q, μ_K/σ_K)``; a KV head shared by g query heads uses the
pooled ``ρ_eff² = Σ σ_Q,g² ρ_g² / Σ σ_Q,g²`` (docs/theory.md §4, GQA).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvquant.core import scalar as cb
from kvquant.core.allocate import water_fill
from kvquant.io.fileio import atomic_path
from kvquant.io.fingerprint import ModelFingerprint
from kvquant.core.groupnorm import (
    SCALE_BITS,
    GroupHistogram,
    causal_groups,
    complete_tokens,
    group_restore,
    group_split,
    outlier_count,
)
from kvquant.core.packing import LEVEL_PACKING, level_bits
from kvquant.core.quantizer import (
    channel_codes,
    channel_values,
    decode_groups,
    encode_groups,
)
from kvquant.core.stats import PairStats, gqa_pooled_rho

FORMAT = "kvquant-codebooks"
FORMAT_VERSION = 1
#: What a codebook file's calibration record must hold: the text, window count and length it was
#: calibrated on (held-out checks and METHOD@B budgets read them; token ranges are optional).
CALIBRATION_RECORD = ("source", "windows", "seqlen")
Norm = Literal["head", "channel", "channel-token", "channel-group"]
NORMS = ("head", "channel", "channel-token", "channel-group")


@dataclass(frozen=True)
class CodebookConfig:
    """How codebooks are built from statistics."""

    method: cb.Method = "lambda"
    bits_q: int = 4
    bits_k: int = 4
    norm: Norm = "head"
    group: int = 128
    sink: int = 0
    outliers: float = 0.0  # channel-group only: fraction of each G×D block kept exact (dense-and-sparse)
    rope: Rope = "post"  # quantize q and k after the rotary embedding, or before it ("pre", kvquant.core.rope)
    # > 0: average code bits per entry over queries and keys, spread over (layer, head, channel, side)
    # by reverse water-filling (kvquant.core.allocate); each channel gets 2, 3, 4, 5, 8, … up to 2^bits_q
    # (queries) / 2^bits_k (keys) levels (at_effective_bits: the budget for exactly b bits in all)
    budget: float = 0.0
    # which sides the budget is spread over: "qk" (the simulated Q·Kᵀ) or "k" (a KV cache whose
    # queries stay exact: the budget is the keys' mean code bits; queries keep bits_q everywhere)
    budget_sides: str = "qk"
    scale_bits: int = 16  # channel-group: bits of each stored (mid, half) value, 16 (fp16) or 8 (groupnorm.code_scales)
    # bits of the values a KV cache of these codebooks stores (make_cache's default; 0: the keys' mean code bits)
    bits_v: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.method not in cb.METHODS:
            raise ValueError(f"method must be one of {', '.join(cb.METHODS)}; got {self.method!r}")
        for name in ("bits_q", "bits_k"):
            try:
                cb.levels_for_bits(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if self.group < 2:
            raise ValueError(f"group (tokens per dynamic channel scale) must be >= 2, got {self.group}")
        if self.sink < 0:
            raise ValueError(f"sink (first tokens kept exact) must be >= 0, got {self.sink}")
        if self.norm == "channel-group" and self.sink >= self.group:
            raise ValueError(f"sink ({self.sink}) must be smaller than group ({self.group}) with norm 'channel-group': "
                             "the exact sink tokens are kept inside the first group")
        if not (isinstance(self.outliers, (int, float)) and 0 <= self.outliers < 0.5):
            raise ValueError(
                f"outliers (fraction of entries per head and group kept exact) must be in [0, 0.5), got {self.outliers!r}"
            )
        if self.rope not in ("post", "pre"):
            raise ValueError(f"rope must be 'post' or 'pre' (quantize after or before the rotary embedding); got {self.rope!r}")
        if self.budget and not (isinstance(self.budget, (int, float)) and cb.MIN_BITS <= self.budget <= max(self.bits_q, self.bits_k)):
            raise ValueError(
                f"budget (average bits per entry) must be in [{cb.MIN_BITS}, max(bits_q, bits_k) = "
                f"{max(self.bits_q, self.bits_k)}] — bits_q/bits_k are the most one head may get; got {self.budget!r}"
            )
        if self.budget and self.norm != "channel-group":
            raise ValueError(
                f"budget (bit allocation) needs norm 'channel-group' (its error curves come from the calibration "
                f"histograms); got norm {self.norm!r}"
            )
        if not (isinstance(self.bits_v, int) and 0 <= self.bits_v <= cb.MAX_BITS):
            raise ValueError(f"bits_v (bits of the cached values; 0 = the keys' mean) must be 0–{cb.MAX_BITS}, got {self.bits_v!r}")
        if self.budget_sides not in ("qk", "k"):
            raise ValueError(f"budget_sides must be 'qk' (queries and keys) or 'k' (keys only); got {self.budget_sides!r}")
        if self.scale_bits not in SCALE_BITS:
            raise ValueError(f"scale_bits (bits per stored group mid/half) must be one of {SCALE_BITS}, got {self.scale_bits!r}")
        if self.scale_bits != 16 and self.norm != "channel-group":
            raise ValueError(f"scale_bits {self.scale_bits} needs norm 'channel-group' (static scales are per model); got {self.norm!r}")
        if self.outliers and self.norm != "channel-group":
            raise ValueError(f"outliers > 0 needs norm 'channel-group' (they are found per group); got norm {self.norm!r}")

    @property
    def dynamic(self) -> bool:
        return self.norm == "channel-group"

    def effective_bits(self, code_bits: float, head_dim: int, seqlen: int | None = None) -> float:
        """Bits per entry held after ``seqlen`` tokens for ``code_bits`` bits of codes per entry
        (averaged over queries and keys), as the KV cache holds them. Static scales and tables are
        per model and add nothing per entry; ``channel-token`` adds an fp16 scale per token and head,
        16/D; ``channel-group`` adds a (mid, half) per channel per
        complete group, 2·scale_bits/G (32/G in fp16, 16/G in 8 bits), and the newest incomplete
        group (``seqlen mod G`` tokens) is held exact, 16 bits per entry instead of codes; the
        ``sink`` exact tokens cost 16 bits *on top of* their code slot (the layout keeps one).
        ``seqlen`` is required when sink > 0; without it a group mode counts whole groups only.

        Outliers (dense-and-sparse, ``outliers = p``): each (group × D) block keeps
        ``n = ⌈p·G·D⌉`` entries exact, each costing an fp16 value plus its position in the
        block, ``⌈log2(G·D)⌉`` bits (13 for 128 × 64), *on top of* the dense b-bit code (a packed
        dense layout keeps a code at every position). So, for the entries of complete groups,

            bits = code_bits + 2·scale_bits/G + (n / (G·D)) · (16 + ⌈log2(G·D)⌉)

        p = 0.5 % at G = 128, D = 64: n = 41, +0.145 bits."""
        bits = code_bits
        if self.norm == "channel-token":
            bits += 16 / head_dim
        if self.dynamic:
            bits += 2 * self.scale_bits / self.group
        if self.outliers:
            block = self.group * head_dim
            bits += outlier_count(self.outliers, block) / block * (16 + math.ceil(math.log2(block)))
        if self.dynamic and seqlen:
            tail = (seqlen - complete_tokens(seqlen, self.group)) / seqlen
            bits = bits * (1 - tail) + 16 * tail
        if self.sink:
            if not seqlen:
                raise ValueError("effective bits with exact sink tokens depend on the sequence length")
            bits += 16 * min(self.sink, seqlen) / seqlen
        return bits

    def code_bits(self, effective_bits: float, head_dim: int, seqlen: int | None = None) -> float:
        """Inverse of :meth:`effective_bits`: the code ``budget`` that makes ``effective_bits``."""
        at0, at1 = self.effective_bits(0.0, head_dim, seqlen), self.effective_bits(1.0, head_dim, seqlen)
        if at1 == at0:
            raise ValueError(f"at seqlen {seqlen} no group of {self.group} tokens is complete, so every entry is held "
                             "exact and no code budget sets the effective bits: use a seqlen of at least the group")
        return (effective_bits - at0) / (at1 - at0)

    def at_effective_bits(self, effective_bits: float, head_dim: int, seqlen: int | None = None,
                          caps: tuple[int, int] | None = None) -> "CodebookConfig":
        """This configuration with the code ``budget`` that makes exactly ``effective_bits`` (codes,
        scales, exact sinks; :meth:`code_bits`) and per-channel caps ``(bits_q, bits_k)`` —
        by default ``⌈budget⌉ + 2`` bits (at most 8). ValueError (naming the effective bits) if the
        overheads alone leave less than 1 code bit."""
        budget = round(self.code_bits(effective_bits, head_dim, seqlen), 6)
        cap = min(cb.MAX_BITS, max(cb.MIN_BITS, math.ceil(budget) + 2))
        bits_q, bits_k = caps or (cap, cap)
        try:
            return replace(self, budget=budget, bits_q=bits_q, bits_k=bits_k)
        except ValueError as e:
            raise ValueError(f"{effective_bits:g} effective bits leave {budget:.3f} code bits per entry after scales "
                             f"and sinks: {e}") from None


@dataclass
class SideBooks:
    """Codebooks of one side (queries or keys): centers (L, H, K), boundaries (L, H, K−1),
    offset and scale (L, H, D) in the activations' units.

    With bit allocation, ``channel_levels`` (L, H, D) gives each channel its number of levels
    (2, 3, 4, 5, 8, …, ≤ 2^bits; 3 and 5 pack at 1.6 and 2.33 bits, :data:`kvquant.core.packing.LEVEL_PACKING`)
    and every channel has its own table: centers (L, H, D, K), boundaries (L, H, D, K−1),
    K = 2^bits; a channel with n levels uses its head's n-level codebook, its boundaries padded
    with +inf (codes never reach the padding) and its centers with its last center."""

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
            out = group_restore(_fake_quantize(xt, centers, bounds), mid, half, self.group)
            return torch.where(exact, x.float(), out).to(x.dtype)
        q = encode_groups(x, self.group, self.scale_bits, bounds)  # the KV cache's quantizer
        return decode_groups(q, centers, self.group).to(x.dtype)

    def _apply_static(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        dev = x.device
        centers, bounds = self.centers[layer].to(dev), self.boundaries[layer].to(dev)
        off = self.offset[layer].to(dev)[None, :, None, :]
        sc = self.scale[layer].to(dev)[None, :, None, :]
        xn = (x.float() - off) / sc
        if not self.token_scale:
            return (cb.fake_quantize(xn, centers, bounds, dim=1) * sc + off).to(x.dtype)
        # one fp16 scale per token and head: the token's largest |x̃| onto the outermost center
        top = centers.abs().flatten(1).amax(-1)[None, :, None, None]
        r = (xn.abs().amax(-1, keepdim=True) / top).clamp_min(torch.finfo(torch.float16).tiny).half().float()
        return (cb.fake_quantize(xn / r, centers, bounds, dim=1) * r * sc + off).to(x.dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = ("centers", "boundaries", "offset", "scale") + (("channel_levels",) if self.channel_levels is not None else ())
        return {f"{prefix}.{k}": getattr(self, k).contiguous() for k in names}


def _fake_quantize(xt: torch.Tensor, centers: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """x̃ (B, H, T, D) through one layer's tables: per head (H, K) or per channel (H, D, K)."""
    return channel_values(channel_codes(xt, bounds), centers)


@lru_cache(maxsize=4096)
def _pair(method: str, bits_q: int, bits_k: int, rho: float, m_q: float, m_k: float):
    return cb.gaussian_pair_codebooks(method, bits_q, bits_k, rho, m_q, m_k)


def _r(v: float) -> float:
    """Statistics rounded to 0.01 before building, so near-identical heads share the work
    (a change of 0.01 in ρ or in μ/σ moves the pair error by well under 0.1%)."""
    return round(float(v), 2)


def allocate_levels(book, fisher: dict[str, np.ndarray], channel_fisher: dict[str, np.ndarray], caps: dict[str, int],
                    budget: float, nodes: np.ndarray) -> dict[str, np.ndarray]:
    """Levels per (layer, head, channel) of each side (``"q"``, ``"k"``) by :func:`kvquant.core.allocate.water_fill`.

    Unit: one channel of one head, quantized with its head's n-level codebook ``book(side, layer,
    head, n)``; options n ∈ {2, 3, 4, 5, 8, 16, …, 2^cap} at their packed bits (3 levels 1.6 bits,
    5 levels 2.33; :data:`kvquant.core.packing.LEVEL_PACKING`). Its distortion with n levels is the
    diagonal-Fisher (second-order) estimate of the calibration loss increase,
    ``D(n) = ½ F_c · ε(n)``: ``F_c = channel_fisher[side][layer, head, c]`` (Σ half² · (∂loss/∂x)²
    over the channel's entries) times the head's Fisher-weighted mean squared error in x̃ units,
    ``ε(n) = Σ_i f_i (node_i − Q_n(node_i))² / Σ_i f_i`` with ``f = fisher[side][layer, head]``
    (the channels of a head share its x̃ histogram). Summed over a head's channels this is the
    head's own estimate ``½ Σ_i f_i (node_i − Q_n(node_i))²``; the loss is one scale for every
    layer, head and side. Channels differ a lot — a channel's error is multiplied by its partners'
    values, and its range by the group's — so the budget moves to where it lowers the loss most.
    Cost of a bit: ``1 / (2 · L · H_side · D)`` of the average ``½(mean_q bits + mean_k bits)``
    (``1 / (L · H_k · D)`` of the keys' mean when ``fisher`` holds the keys only).
    Every channel gets between 2 and 2^cap levels (cap = its side's bits).
    """
    options = [n for n in sorted(LEVEL_PACKING) if n <= 2 ** max(caps.values())]
    option_bits = np.array([level_bits(n) for n in options])
    curves, costs, his, shapes = [], [], [], {}
    for side, weight in fisher.items():
        L, H, _ = weight.shape
        chan = channel_fisher[side]
        D = chan.shape[-1]
        shapes[side] = (L, H, D)
        top = options.index(2 ** caps[side])
        eps = np.zeros((L, H, len(options)))
        for layer, h in itertools.product(range(L), range(H)):
            total = weight[layer, h].sum()
            for i, n in enumerate(options[: top + 1]):
                err = cb.histogram_distortion(book(side, layer, h, n), nodes, weight[layer, h])
                eps[layer, h, i] = err / total if total > 0 else 0.0
        curves.append((0.5 * chan[..., None] * eps[:, :, None, :]).reshape(-1, len(options)))
        costs.append(np.full(L * H * D, 1 / (len(fisher) * L * H * D)))
        his.append(np.full(L * H * D, top))
    chosen = water_fill(np.concatenate(curves), np.concatenate(costs), budget, 0, np.concatenate(his), option_bits)
    levels = np.array(options)[chosen]
    out, start = {}, 0
    for side, shape in shapes.items():
        n = int(np.prod(shape))
        out[side] = levels[start : start + n].reshape(shape)
        start += n
    return out


@dataclass
class Codebooks:
    """Per-layer, per-head codebooks for queries and keys of one model."""

    config: CodebookConfig
    q: SideBooks
    k: SideBooks
    fingerprint: ModelFingerprint
    stats: PairStats
    calibration: dict = field(default_factory=dict)
    hist: GroupHistogram | None = None

    # --- building -------------------------------------------------------------------
    @classmethod
    def from_stats(
        cls, stats: PairStats, config: CodebookConfig, fingerprint: ModelFingerprint,
        calibration: dict | None = None, hist: GroupHistogram | None = None,
    ) -> "Codebooks":
        """Build every head's codebooks from pair statistics (see module docstring); the
        dynamic ``channel-group`` normalisation builds them from ``hist`` instead."""
        if config.dynamic:
            return cls._from_hist(stats, config, fingerprint, calibration, hist)
        L, H, D = stats.shape
        g = H // fingerprint.num_kv_heads
        if config.norm == "head":
            hm = stats.head_moments()  # (L, H)
            rho_q, m_q, m_k = hm.rho, hm.mean_q / hm.sigma_q, hm.mean_k / hm.sigma_k
            sig_q = hm.sigma_q
            off_q, sc_q = hm.mean_q[..., None].expand(L, H, D), hm.sigma_q[..., None].expand(L, H, D)
            off_k, sc_k = hm.mean_k[..., None].expand(L, H, D), hm.sigma_k[..., None].expand(L, H, D)
        else:  # per channel (and token): normalised pairs are zero-mean, pooled ρ is the channels' mean ρ
            cm = stats.channel_moments()  # (L, H, D)
            rho_q = cm.rho.mean(-1)
            m_q = m_k = torch.zeros(L, H, dtype=torch.float64)
            sig_q = torch.ones(L, H, dtype=torch.float64)
            off_q, sc_q, off_k, sc_k = cm.mean_q, cm.sigma_q, cm.mean_k, cm.sigma_k
        rho_k = gqa_pooled_rho(sig_q, rho_q, g)  # (L, H_kv)
        w = (sig_q**2).unflatten(-1, (-1, g))
        m_q_pooled = (w * m_q.unflatten(-1, (-1, g))).sum(-1) / w.sum(-1)
        m_k_kv = m_k.unflatten(-1, (-1, g))[..., 0]
        kq, kk = 2**config.bits_q, 2**config.bits_k
        cq, bq = torch.empty(L, H, kq), torch.empty(L, H, kq - 1)
        ck, bk = torch.empty(L, H // g, kk), torch.empty(L, H // g, kk - 1)
        args = (config.method, config.bits_q, config.bits_k)
        for layer in range(L):
            for h in range(H):
                book = _pair(*args, _r(rho_q[layer, h]), _r(m_q[layer, h]), _r(m_k[layer, h]))[0]
                cq[layer, h], bq[layer, h] = torch.from_numpy(book.centers), torch.from_numpy(book.boundaries)
            for h in range(H // g):
                book = _pair(*args, _r(rho_k[layer, h]), _r(m_q_pooled[layer, h]), _r(m_k_kv[layer, h]))[1]
                ck[layer, h], bk[layer, h] = torch.from_numpy(book.centers), torch.from_numpy(book.boundaries)
        kv_rows = slice(None, None, g)  # key statistics are repeated over each KV head's queries
        eps = torch.finfo(torch.float32).tiny
        token = config.norm == "channel-token"
        return cls(
            config=config,
            q=SideBooks(config.bits_q, cq, bq, off_q.float().contiguous(), sc_q.float().clamp_min(eps).contiguous(), 0,
                        config.sink, token_scale=token),
            k=SideBooks(
                config.bits_k, ck, bk, off_k[:, kv_rows].float().contiguous(),
                sc_k[:, kv_rows].float().clamp_min(eps).contiguous(), 0, config.sink, token_scale=token,
            ),
            fingerprint=fingerprint,
            stats=stats,
            calibration=dict(calibration or {}),
        )

    @classmethod
    def _from_hist(cls, stats, config, fingerprint, calibration, hist) -> "Codebooks":
        want = (config.group, config.sink, float(config.outliers), config.scale_bits)
        if hist is None or hist.key != want:
            have = "none" if hist is None else (f"group {hist.group}, sink {hist.sink}, outliers {hist.outliers:g}, "
                                                f"scale_bits {hist.scale_bits}")
            raise ValueError(
                f"norm 'channel-group' with group {config.group}, sink {config.sink}, outliers {config.outliers:g}, "
                f"scale_bits {config.scale_bits} "
                f"needs calibration histograms captured with the same settings (have: {have}); "
                "re-run calibration with them"
            )
        nodes = hist.nodes.numpy()
        hists = {"q": (hist.count_q.numpy(), hist.weight_q.numpy()), "k": (hist.count_k.numpy(), hist.weight_k.numpy())}
        caps = {"q": config.bits_q, "k": config.bits_k}

        @lru_cache(maxsize=None)
        def book(side: str, layer: int, h: int, levels: int) -> cb.Codebook:
            count, weight = hists[side]
            return cb.histogram_codebook(config.method, levels, nodes, count[layer, h], weight[layer, h])

        if config.budget:
            if hist.fisher_q is None or hist.channel_fisher_q is None:
                raise ValueError(
                    "budget (bit allocation) needs calibration histograms with Fisher weights; re-run calibration "
                    "with budget > 0 (or capture(..., fisher=True))"
                )
            sides = ("q", "k") if config.budget_sides == "qk" else ("k",)
            fisher = {s: getattr(hist, f"fisher_{s}").numpy() for s in sides}
            channel_fisher = {s: getattr(hist, f"channel_fisher_{s}").numpy() for s in sides}
            channel_levels = allocate_levels(book, fisher, channel_fisher, caps, config.budget, nodes)
        else:
            channel_levels = None

        def side_books(side: str) -> SideBooks:
            L, H = hists[side][0].shape[:2]
            D = fingerprint.head_dim
            unit = torch.zeros(L, H, D)
            if channel_levels is None or side not in channel_levels:
                k = 2 ** caps[side]
                centers, bounds = torch.empty(L, H, k), torch.empty(L, H, k - 1)
                for layer, h in itertools.product(range(L), range(H)):
                    b = book(side, layer, h, k)
                    centers[layer, h], bounds[layer, h] = torch.from_numpy(b.centers), torch.from_numpy(b.boundaries)
                return SideBooks(caps[side], centers, bounds, unit, unit + 1, config.group, config.sink, config.outliers,
                                 None, config.scale_bits)
            levels = torch.from_numpy(channel_levels[side])
            top = math.ceil(math.log2(int(levels.max())))
            k = 2**top
            centers, bounds = torch.empty(L, H, D, k), torch.full((L, H, D, k - 1), math.inf)
            for layer, h in itertools.product(range(L), range(H)):
                table_c, table_b = torch.empty(k + 1, k), torch.full((k + 1, k - 1), math.inf)  # row n: n levels
                for n in levels[layer, h].unique().tolist():
                    book_n = book(side, layer, h, n)
                    table_c[n, :n], table_c[n, n:] = torch.from_numpy(book_n.centers), float(book_n.centers[-1])
                    table_b[n, : n - 1] = torch.from_numpy(book_n.boundaries)
                rows = levels[layer, h].long()
                centers[layer, h], bounds[layer, h] = table_c[rows], table_b[rows]
            return SideBooks(top, centers, bounds, unit, unit + 1, config.group, config.sink, config.outliers,
                             levels.to(torch.int16), config.scale_bits)

        return cls(config, side_books("q"), side_books("k"), fingerprint, stats, dict(calibration or {}), hist)

    def rebuilt(self, **changes) -> "Codebooks":
        """Codebooks from the same statistics with another method/bits (norm/group/sink only
        where the stored histograms were captured with them; never another ``rope`` frame)."""
        if changes.get("rope", self.config.rope) != self.config.rope:
            raise ValueError(
                f"these statistics were captured {self.config.rope}-RoPE; calibrate again with rope={changes['rope']!r}"
            )
        return Codebooks.from_stats(self.stats, replace(self.config, **changes), self.fingerprint, self.calibration, self.hist)

    def at_effective_bits(self, effective_bits: float, seqlen: int, **changes) -> "Codebooks":
        """Codebooks from the same statistics (``changes`` applied, e.g. ``method``) with the code
        budget that makes exactly ``effective_bits`` at ``seqlen`` (:meth:`CodebookConfig.at_effective_bits`,
        caps ⌈budget⌉ + 2) — what ``kvquant calibrate --effective-bits B`` would build from the same
        windows. Needs a channel-group file calibrated with Fisher weights (an allocated one)."""
        if self.hist is None or self.hist.fisher_q is None:
            raise ValueError(
                "rebuilding at another effective-bits target needs the Fisher weights of an allocated calibration: "
                "calibrate with --effective-bits (the default) or --budget"
            )
        config = replace(self.config, **changes).at_effective_bits(effective_bits, self.fingerprint.head_dim, seqlen)
        return self.rebuilt(**{k: getattr(config, k) for k in ("budget", "bits_q", "bits_k")}, **changes)

    def causal_queries(self, bits: int | None = None, norm: str = "channel-token") -> "Codebooks":
        """Codebooks whose queries are quantized causally — each query from its own token and
        static tables — for :func:`kvquant.query_quantizer` beside a KV cache, from the same
        statistics and frame: per-channel (μ, σ) of the calibration, the head's pair codebook at
        ``bits`` (default the file's ``bits_q``) and, with ``norm="channel-token"`` (the default,
        chosen on development windows: eval/causal_queries.py), a per-token scale so that no
        entry is clipped; ``norm="channel"`` leaves it out. The keys of the result are not meant to
        be used (the cache holds this file's). Codebooks with a static norm are returned as they
        are (rebuilt at ``bits`` if given)."""
        if not self.config.dynamic:
            return self if bits is None else self.rebuilt(bits_q=bits)
        if norm not in ("channel", "channel-token"):
            raise ValueError(f"causal query norms are 'channel' and 'channel-token', got {norm!r}")
        bits = bits or self.config.bits_q
        return self.rebuilt(norm=norm, bits_q=bits, bits_k=bits, budget=0.0, budget_sides="qk", scale_bits=16,
                            outliers=0.0)

    # --- use ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.method

    @property
    def rope(self) -> Rope:
        """Frame of the entries these codebooks quantize (read by :func:`kvquant.wrap`)."""
        return self.config.rope

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        return (self.q if side == "q" else self.k).apply(x, layer)

    @property
    def key_group(self) -> int:
        """G of the keys' causal groups (0: static keys): the simulated attention then reads a key
        quantized only from the query that completes its group on, as a KV cache serves it
        (:func:`kvquant.hf.attention.block_causal_attention`)."""
        return self.k.group

    def effective_bits(self, head_dim: int | None = None, seqlen: int | None = None) -> float:
        """Bits per entry, averaged over queries and keys (:meth:`CodebookConfig.effective_bits`
        of the code bits ``½(mean_q + mean_k)``), or of the keys alone for ``budget_sides="k"``;
        ``head_dim`` defaults to the model's."""
        code = self.k.mean_bits if self.config.budget_sides == "k" else 0.5 * (self.q.mean_bits + self.k.mean_bits)
        return self.config.effective_bits(code, head_dim or self.fingerprint.head_dim, seqlen)

    def check_fits(self, model: torch.nn.Module) -> None:
        """Raise ValueError listing what differs if these codebooks were made for another model."""
        diffs = self.fingerprint.differences(ModelFingerprint.from_model(model))
        if diffs:
            raise ValueError(
                f"codebooks were calibrated for {self.fingerprint.name_or_path or self.fingerprint.model_type} "
                "and do not fit this model:\n  - " + "\n  - ".join(diffs)
                + "\nRe-run `kvquant calibrate` on this model."
            )

    # --- files ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One safetensors file: tensors + JSON metadata (config, fingerprint, calibration)."""
        from kvquant import __version__

        tensors = {**self.q.tensors("q"), **self.k.tensors("k")}
        tensors.update({f"stats.{k}": v.contiguous() for k, v in self.stats.to_dict().items()})
        if self.hist is not None:
            tensors.update({f"hist.{k}": v.contiguous() for k, v in self.hist.to_dict().items()})
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "kvquant_version": __version__,
            "config": json.dumps(asdict(self.config)),
            "fingerprint": self.fingerprint.to_json(),
            "calibration": json.dumps(self.calibration),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Codebooks":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no codebook file at {path}; create one with `kvquant calibrate --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for non-safetensors files
            raise ValueError(f"{path} is not a safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvquant codebook file (metadata format={meta.get('format')!r})")
        if int(meta.get("format_version", -1)) != FORMAT_VERSION:
            raise ValueError(
                f"{path} has codebook format version {meta.get('format_version')}, this kvquant reads "
                f"{FORMAT_VERSION}; re-run `kvquant calibrate`"
            )
        if "q.head_bits" in t:
            raise ValueError(f"{path} allocates bits per head (an earlier kvquant); this one allocates per channel: "
                             "re-run `kvquant calibrate`")
        damaged = lambda e: ValueError(  # noqa: E731
            f"{path}: its metadata is damaged ({type(e).__name__}: {e}); re-run `kvquant calibrate`")
        try:
            config_dict, calibration = json.loads(meta["config"]), json.loads(meta.get("calibration", "{}"))
        except (KeyError, ValueError) as e:
            raise damaged(e) from None
        missing = [f"config.{f.name}" for f in fields(CodebookConfig) if f.name not in config_dict]
        missing += [f"calibration.{k}" for k in CALIBRATION_RECORD if k not in calibration]
        if missing:  # defaults would change what the file means (bits held, held-out checks, budgets)
            raise ValueError(f"{path} lacks {', '.join(missing)} (written by an earlier kvquant, or edited): "
                             "re-run `kvquant calibrate`")
        try:
            config = CodebookConfig(**config_dict)
            fingerprint = ModelFingerprint.from_json(meta["fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise damaged(e) from None
        problem = file_problem(t, config, fingerprint)
        if problem:
            raise ValueError(f"{path} is damaged or was not written by kvquant: {problem}; re-run `kvquant calibrate`")
        group = config.group if config.dynamic else 0
        side = lambda p, bits: SideBooks(  # noqa: E731
            bits, *(t[f"{p}.{k}"] for k in ("centers", "boundaries", "offset", "scale")), group, config.sink,
            config.outliers, t.get(f"{p}.channel_levels"), config.scale_bits, config.norm == "channel-token",
        )
        stats = PairStats.from_dict({k[len("stats."):]: v for k, v in t.items() if k.startswith("stats.")})
        hist_t = {k[len("hist."):]: v for k, v in t.items() if k.startswith("hist.")}
        return cls(
            config=config,
            q=side("q", int(t["q.centers"].shape[-1]).bit_length() - 1),
            k=side("k", int(t["k.centers"].shape[-1]).bit_length() - 1),
            fingerprint=fingerprint,
            stats=stats,
            calibration=calibration,
            hist=GroupHistogram.from_dict(hist_t) if hist_t else None,
        )


def file_problem(t: dict[str, torch.Tensor], config: CodebookConfig, fp: ModelFingerprint) -> str | None:
    """The first thing wrong with the tensors ``t`` of a codebook file for its own ``config`` and
    ``fp`` (model geometry), or None. Per side (``q``: H = heads, ``k``: H = KV heads; L layers,
    D = head_dim): ``centers`` float32 (L, H, K) or (L, H, D, K), K a power of two ≤ 2^8, finite and
    non-decreasing; ``boundaries`` float32, K−1 in the last axis, non-decreasing, no NaN (+inf pads
    a channel's unused levels); ``offset``/``scale`` float32 (L, H, D), finite, scale > 0;
    ``channel_levels`` (allocated files) int16 (L, H, D) in 2..K. ``stats.*``: (L, H, D) floats."""
    L, D = fp.num_layers, fp.head_dim
    for side, H in (("q", fp.num_heads), ("k", fp.num_kv_heads)):
        for name in ("centers", "boundaries", "offset", "scale"):
            if f"{side}.{name}" not in t:
                return f"tensor {side}.{name} is missing"
        c, b, off, sc = (t[f"{side}.{n}"] for n in ("centers", "boundaries", "offset", "scale"))
        for name, x in (("centers", c), ("boundaries", b), ("offset", off), ("scale", sc)):
            if x.dtype != torch.float32:
                return f"{side}.{name} is {str(x.dtype).removeprefix('torch.')}, not float32"
        K = c.shape[-1]
        if c.shape[:3] != (L, H, c.shape[2]) or c.ndim not in (3, 4) or (c.ndim == 4 and c.shape[2] != D):
            return f"{side}.centers has shape {tuple(c.shape)}, expected ({L}, {H}[, {D}], K) for this model"
        if K < 2 or K & (K - 1) or K > 2**cb.MAX_BITS:
            return f"{side}.centers has {K} levels, not a power of two in 2..{2**cb.MAX_BITS}"
        if tuple(b.shape) != (*c.shape[:-1], K - 1):
            return f"{side}.boundaries has shape {tuple(b.shape)}, expected {(*c.shape[:-1], K - 1)}"
        for name, x in (("offset", off), ("scale", sc)):
            if tuple(x.shape) != (L, H, D):
                return f"{side}.{name} has shape {tuple(x.shape)}, expected {(L, H, D)}"
            if not torch.isfinite(x).all():
                return f"{side}.{name} holds NaN/inf"
        if not (sc > 0).all():
            return f"{side}.scale holds values <= 0"
        if not torch.isfinite(c).all() or (c.diff(dim=-1) < 0).any():
            return f"{side}.centers are not finite and sorted"
        if b.isnan().any() or (b == -math.inf).any() or (b.diff(dim=-1) < 0).any():
            return f"{side}.boundaries are not sorted (or hold NaN / -inf)"
        levels = t.get(f"{side}.channel_levels")
        if levels is not None:
            if levels.dtype != torch.int16 or tuple(levels.shape) != (L, H, D):
                return (f"{side}.channel_levels is {str(levels.dtype).removeprefix('torch.')} {tuple(levels.shape)}, "
                        f"expected int16 {(L, H, D)}")
            if (levels < 2).any() or (levels > K).any():
                return f"{side}.channel_levels outside 2..{K}"
        elif c.ndim == 4:
            return f"{side}.channel_levels is missing (the centers are per channel)"
    for k in (f"stats.{f.name}" for f in fields(PairStats)):
        if k not in t:
            return f"tensor {k} (calibration statistics) is missing"
        if not t[k].is_floating_point() or tuple(t[k].shape) != (L, fp.num_heads, D):
            return f"{k} is {str(t[k].dtype).removeprefix('torch.')} {tuple(t[k].shape)}, expected floats {(L, fp.num_heads, D)}"
    return None
