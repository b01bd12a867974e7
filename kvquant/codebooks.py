"""A model's codebooks: one per (layer, query head) and per (layer, KV head), saved with their
statistics, configuration and model fingerprint in one safetensors file.

Normalisation (static, from calibration), per head or per channel:
``x̃ = (x − offset) / scale`` with offset = mean and scale = σ of x over the multiplying pairs;
the codebook quantizes x̃ (its centers are in σ units) and ``x̂ = offset + scale · center``.
Static scales and tables are per model, not per token, so the effective bits per entry are
exactly the codebook bits.

Codebooks come from the Gaussian pair model fitted to the calibration statistics:
query head h uses ``(ρ_h, μ_Q/σ_Q, μ_K/σ_K)``; a KV head shared by g query heads uses the
pooled ``ρ_eff² = Σ σ_Q,g² ρ_g² / Σ σ_Q,g²`` (DESIGN.md §1, GQA).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvquant import codebook as cb
from kvquant.fileio import atomic_path
from kvquant.fingerprint import ModelFingerprint
from kvquant.stats import PairStats, gqa_pooled_rho

FORMAT = "kvquant-codebooks"
FORMAT_VERSION = 1
Norm = Literal["head", "channel"]
NORMS = ("head", "channel")


@dataclass(frozen=True)
class CodebookConfig:
    """How codebooks are built from statistics."""

    method: cb.Method = "lambda"
    bits_q: int = 4
    bits_k: int = 4
    norm: Norm = "head"
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


@dataclass
class SideBooks:
    """Codebooks of one side (queries or keys): centers (L, H, K), boundaries (L, H, K−1),
    offset and scale (L, H, D) in the activations' units."""

    bits: int
    centers: torch.Tensor
    boundaries: torch.Tensor
    offset: torch.Tensor
    scale: torch.Tensor

    def apply(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Quantize-dequantize ``x`` (B, H, T, D) with layer ``layer``'s codebooks."""
        if x.shape[1] != self.centers.shape[1] or x.shape[-1] != self.offset.shape[-1]:
            raise ValueError(
                f"tensor has {x.shape[1]} heads × {x.shape[-1]} dims, codebooks are for "
                f"{self.centers.shape[1]} × {self.offset.shape[-1]}"
            )
        dev = x.device
        off = self.offset[layer].to(dev)[None, :, None, :]
        sc = self.scale[layer].to(dev)[None, :, None, :]
        xn = (x.float() - off) / sc
        xq = cb.fake_quantize(xn, self.centers[layer].to(dev), self.boundaries[layer].to(dev), dim=1)
        return (xq * sc + off).to(x.dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k).contiguous() for k in ("centers", "boundaries", "offset", "scale")}


@lru_cache(maxsize=4096)
def _pair(method: str, bits_q: int, bits_k: int, rho: float, m_q: float, m_k: float):
    return cb.gaussian_pair_codebooks(method, bits_q, bits_k, rho, m_q, m_k)


def _r(v: float) -> float:
    """Statistics rounded to 0.01 before building, so near-identical heads share the work
    (a change of 0.01 in ρ or in μ/σ moves the pair error by well under 0.1%)."""
    return round(float(v), 2)


@dataclass
class Codebooks:
    """Per-layer, per-head codebooks for queries and keys of one model."""

    config: CodebookConfig
    q: SideBooks
    k: SideBooks
    fingerprint: ModelFingerprint
    stats: PairStats
    calibration: dict = field(default_factory=dict)

    # --- building -------------------------------------------------------------------
    @classmethod
    def from_stats(
        cls, stats: PairStats, config: CodebookConfig, fingerprint: ModelFingerprint, calibration: dict | None = None
    ) -> "Codebooks":
        """Build every head's codebooks from pair statistics (see module docstring)."""
        L, H, D = stats.shape
        g = H // fingerprint.num_kv_heads
        if config.norm == "head":
            hm = stats.head_moments()  # (L, H)
            rho_q, m_q, m_k = hm.rho, hm.mean_q / hm.sigma_q, hm.mean_k / hm.sigma_k
            sig_q = hm.sigma_q
            off_q, sc_q = hm.mean_q[..., None].expand(L, H, D), hm.sigma_q[..., None].expand(L, H, D)
            off_k, sc_k = hm.mean_k[..., None].expand(L, H, D), hm.sigma_k[..., None].expand(L, H, D)
        else:  # per channel: normalised pairs are zero-mean, pooled ρ is the channels' mean ρ
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
        return cls(
            config=config,
            q=SideBooks(config.bits_q, cq, bq, off_q.float().contiguous(), sc_q.float().clamp_min(eps).contiguous()),
            k=SideBooks(
                config.bits_k, ck, bk, off_k[:, kv_rows].float().contiguous(),
                sc_k[:, kv_rows].float().clamp_min(eps).contiguous(),
            ),
            fingerprint=fingerprint,
            stats=stats,
            calibration=dict(calibration or {}),
        )

    def rebuilt(self, **changes) -> "Codebooks":
        """Codebooks from the same statistics with another method/bits/norm."""
        return Codebooks.from_stats(self.stats, replace(self.config, **changes), self.fingerprint, self.calibration)

    # --- use ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.method

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        return (self.q if side == "q" else self.k).apply(x, layer)

    def effective_bits(self, head_dim: int | None = None) -> float:
        """Bits per entry, averaged over queries and keys (static scales and tables are per
        model, so they add nothing per entry)."""
        return 0.5 * (self.config.bits_q + self.config.bits_k)

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
        config = CodebookConfig(**json.loads(meta["config"]))
        side = lambda p, bits: SideBooks(bits, *(t[f"{p}.{k}"] for k in ("centers", "boundaries", "offset", "scale")))  # noqa: E731
        stats = PairStats.from_dict({k[len("stats."):]: v for k, v in t.items() if k.startswith("stats.")})
        return cls(
            config=config,
            q=side("q", config.bits_q),
            k=side("k", config.bits_k),
            fingerprint=ModelFingerprint.from_json(meta["fingerprint"]),
            stats=stats,
            calibration=json.loads(meta.get("calibration", "{}")),
        )
