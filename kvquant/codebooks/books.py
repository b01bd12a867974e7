"""A model's codebooks (:class:`Codebooks`): built from calibration statistics, rebuilt at other
bits, applied as a :func:`kvquant.wrap` quantizer, saved and loaded."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvquant.codebooks.allocation import (
    allocate_levels,
    allocate_static_levels,
    cached_level_book,
    cached_pair_books,
    channel_tables,
    expected_max_abs_gaussian,
    rounded_stat,
)
from kvquant.codebooks.config import FORMAT, FORMAT_VERSION, CodebookConfig
from kvquant.codebooks.fileformat import CALIBRATION_RECORD, file_problem
from kvquant.codebooks.sides import SideBooks
from kvquant.core import pair_codebooks as pcb
from kvquant.core import scalar as cb
from kvquant.core.groupnorm import GroupHistogram
from kvquant.core.rope import Rope
from kvquant.core.stats import PairStats, gqa_pooled_rho
from kvquant.io.fileio import atomic_path
from kvquant.io.fingerprint import ModelFingerprint


#: Causal query rules of :meth:`Codebooks.causal_queries`.
CAUSAL_QUERY_NORMS = ("channel", "channel-token", "klt")


def query_basis(fisher: torch.Tensor, gram: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor,
                floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``klt`` transform of every query head (float64 in; see :meth:`Codebooks.causal_queries`).

    ``fisher`` (L, H, D) the query channels' Fisher weights F, ``gram`` (L, H, D+1, D+1) the Gram
    matrix of [q, 1] (:attr:`GroupHistogram.gram_q`), ``offset``/``scale`` (L, H, D) μ and σ.
    With f = √max(F, floor · mean F) and z = f ∘ (q − μ)/σ: E[z zᵀ] = V diag(λ) Vᵀ. Returns
    ``(V, √λ, σ/f, λ)`` — the basis (columns: components, ascending λ), the components' standard
    deviations, the scale that makes (q − μ)/scale = z, and λ (the allocation's weights) — the
    first three float32."""
    n = gram[..., -1, -1].clamp_min(1)
    m2, m1 = gram[..., :-1, :-1] / n[..., None, None], gram[..., :-1, -1] / n[..., None]  # E[q qᵀ], E[q]
    centred = m2 - m1[..., :, None] * offset[..., None, :] - offset[..., :, None] * m1[..., None, :] \
        + offset[..., :, None] * offset[..., None, :]  # E[(q − μ)(q − μ)ᵀ]
    f = fisher.clamp_min(floor * fisher.mean(-1, keepdim=True)).sqrt()
    w = f / scale
    lam, vec = torch.linalg.eigh(w[..., :, None] * centred * w[..., None, :])
    lam = lam.clamp_min(1e-12 * lam[..., -1:].clamp_min(1e-300))
    return vec.float().contiguous(), lam.sqrt().float().contiguous(), (scale / f).float().contiguous(), lam


def book_edges(method: str, rho: torch.Tensor, bits: int) -> torch.Tensor:
    """(L, H): the outermost center of each head's 2^bits-level codebook (ρ the head's, ``rho`` (L, H))."""
    return torch.tensor([[float(cached_level_book(method, 2**bits, rounded_stat(r)).centers[-1]) for r in row]
                         for row in rho.tolist()])


def allocated_levels(q: SideBooks, method: str, rho: torch.Tensor, weights: torch.Tensor, budget: float, cap: int,
                     token_range: torch.Tensor | None, min_levels: int = 2) -> SideBooks:
    """``q`` (static) with ``min_levels`` (2, or 1: 0 bits, the entry set to its mean) …
    2^min(cap, 8) levels per channel (or component) water-filled by ``weights`` (L, H, D) at
    ``budget`` mean code bits (:func:`allocate_static_levels`), the tables of each head's n-level
    codebooks (ρ from ``rho`` (L, H)), and ``token_range`` (L, H) as the per-token scale's target
    (None: no per-token scale)."""
    levels = torch.from_numpy(allocate_static_levels(method, rho, weights.double().numpy(), min(cb.MAX_BITS, cap),
                                                     budget, min_levels))
    top, centers, bounds = channel_tables(lambda layer, h, n: cached_level_book(method, n, rounded_stat(rho[layer, h])),
                                          levels)
    return replace(q, bits=top, centers=centers, boundaries=bounds, channel_levels=levels.to(torch.int16),
                   token_scale=token_range is not None, token_range=token_range)


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
                book = cached_pair_books(*args, rounded_stat(rho_q[layer, h]), rounded_stat(m_q[layer, h]), rounded_stat(m_k[layer, h]))[0]
                cq[layer, h], bq[layer, h] = torch.from_numpy(book.centers), torch.from_numpy(book.boundaries)
            for h in range(H // g):
                book = cached_pair_books(*args, rounded_stat(rho_k[layer, h]), rounded_stat(m_q_pooled[layer, h]), rounded_stat(m_k_kv[layer, h]))[1]
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
            return pcb.histogram_codebook(config.method, levels, nodes, count[layer, h], weight[layer, h])

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
            top, centers, bounds = channel_tables(lambda layer, h, n: book(side, layer, h, n), levels)
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

    def causal_queries(self, bits: int | None = None, norm: str | None = None) -> "Codebooks":
        """Codebooks whose queries are quantized causally — each query from its own token and
        static tables — for :func:`kvquant.query_quantizer` beside a KV cache, from the same
        statistics and frame: per-channel (μ, σ) of the calibration, the head's pair codebooks,
        ``bits`` code bits per query entry on average (default the file's ``bits_q``) and:

        - ``norm="channel-token"``: a per-token scale that maps the token's largest entry onto the
          outermost center of the head's 2^bits-level codebook; ``norm="channel"`` leaves it out;
        - ``norm="klt"`` (the default where the file holds what it needs, chosen on development
          windows: eval/causal_queries.py; otherwise ``channel-token`` with a warning): transform
          coding under the error's own metric. A query error e (in x̃ = (x − μ)/σ units) costs
          ≈ Σ_c F_c e_c² (F: the calibration's query Fisher weights, floored at 10⁻³ of the head's
          mean); with z = F^{1/2} ∘ x̃ that is |e_z|², and in the eigenbasis V of z's second moment
          E[z zᵀ] (the calibration's tokens, :attr:`GroupHistogram.gram_q`) the components
          y = Vᵀ z / √λ are uncorrelated with unit variance; each component gets 1 … 2^(bits+3)
          levels (1: 0 bits, the component set to its mean — the weakest give their bits to the
          others), and the per-token scale maps the token's largest |y| among its n coded
          components (2 levels or more) onto the larger of the 2^bits-level codebook's outermost
          center and E[max of n |N(0, 1)|] (≈ 2.60 at n = 64: where a whitened token's largest
          entry lies; all three chosen on development windows, eval/research/klt_variants.py).
          :class:`SideBooks`' ``basis``; σ/√F is the stored scale. Needs a file calibrated with
          Fisher weights by a kvquant that captures the Gram.

        The levels are allocated (:func:`kvquant.codebooks.allocation.allocate_static_levels`:
        2 … 2^(bits+2) levels (``klt``: 1 … 2^(bits+3)), mean ``bits``, reverse water-filling) over
        the channels by the calibration's query Fisher weights, which carry the keys each channel
        multiplies — for ``klt`` over the components by ½ λ_i ε(n) — where the file holds Fisher
        weights (calibrated with a budget, the CLI's default); otherwise every channel gets 2^bits
        levels and a warning says so. The keys of the result are not meant to be used (the cache holds this file's).
        Codebooks with a static norm are returned as they are (rebuilt at ``bits`` if given)."""
        if not self.config.dynamic:
            return self if bits is None else self.rebuilt(bits_q=bits)
        if norm is None:
            norm = "klt" if self.hist is not None and self.hist.gram_q is not None else "channel-token"
            if norm != "klt" and self.hist is not None and self.hist.channel_fisher_q is not None:
                warnings.warn("this codebook file holds no query Gram matrices (calibrated by an earlier kvquant): its "
                              "causal queries use norm 'channel-token', not the default 'klt' (transform coding, lower "
                              "KL divergence); re-run `kvquant calibrate` to get it", stacklevel=2)
        if norm not in CAUSAL_QUERY_NORMS:
            raise ValueError(f"causal query norms are {', '.join(map(repr, CAUSAL_QUERY_NORMS))}, got {norm!r}")
        bits = bits or self.config.bits_q
        books = self.rebuilt(norm="channel" if norm == "channel" else "channel-token", bits_q=bits, bits_k=bits,
                             budget=0.0, budget_sides="qk", scale_bits=16, outliers=0.0)
        fisher = None if self.hist is None else self.hist.channel_fisher_q
        gram = None if self.hist is None else self.hist.gram_q
        if norm == "klt" and (fisher is None or gram is None):
            raise ValueError("norm='klt' needs the calibration's query Fisher weights and Gram matrices, which this "
                             "codebook file does not hold: re-run `kvquant calibrate` (with --effective-bits, the "
                             "default) at this kvquant version")
        if fisher is None:
            warnings.warn("this codebook file holds no Fisher weights of the queries (calibrated without a budget): "
                          f"every query channel gets {2**bits} levels; calibrate with --effective-bits (the default) "
                          "to allocate them", stacklevel=2)
            return books
        q, weights = books.q, fisher.double()
        if norm == "klt":
            basis, sd, scale, weights = query_basis(weights, gram, q.offset.double(), q.scale.double())
            q = replace(q, scale=scale, basis=basis, basis_sd=sd)
        rho = self.stats.channel_moments().rho.mean(-1)  # as from_stats' per-head pair model
        token_range = book_edges(self.config.method, rho, bits) if q.token_scale else None
        q = allocated_levels(q, self.config.method, rho, weights, bits, bits + (3 if norm == "klt" else 2), token_range,
                             min_levels=1 if norm == "klt" else 2)
        if norm == "klt":  # whitened components: the largest of a head's n coded ones sits near E[max of n |N(0, 1)|]
            emax = torch.tensor([[expected_max_abs_gaussian(int(n)) for n in row]
                                 for row in (q.channel_levels > 1).sum(-1).tolist()])
            q = replace(q, token_range=torch.maximum(q.token_range, emax.to(q.token_range.dtype)))
        return replace(books, q=q)

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
            t.get(f"{p}.token_range"), t.get(f"{p}.basis"), t.get(f"{p}.basis_sd"),
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
