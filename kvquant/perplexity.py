"""Perplexity of a model on token windows, with queries/keys quantized in several ways.

Protocol (GPTQ/KVQuant, docs/theory.md §8): non-overlapping windows of ``seqlen`` tokens, each
scored on its own (no context carried over); ``ppl = exp(Σ NLL / #predicted tokens)`` where every
position but the first of a window predicts the next token. All rows run in one process on the
same windows; the unquantized row ``fp`` uses kvquant's attention in ``off`` mode, which is
bit-identical to the model's SDPA attention.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvquant.attention import Quantizer
from kvquant.baselines import Baseline, is_baseline
from kvquant.codebooks import Codebooks
from kvquant.scalar import METHODS
from kvquant.wrap import wrapped


@dataclass(frozen=True)
class PplRow:
    """One row of a perplexity table. ``effective_bits``: per q/k entry, scales included (in
    generation mode: per K/V entry the cache holds, everything counted)."""

    name: str
    ppl: float
    nll: float
    tokens: int
    effective_bits: float
    seconds: float
    kv_bytes_per_token: float | None = None  # generation mode: bytes the cache holds per token (kvquant.generation)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def nll_sum(model: torch.nn.Module, ids: torch.Tensor, progress: bool = True, desc: str = "ppl") -> tuple[float, int]:
    """Σ NLL (nats, float64) and number of predicted tokens over windows ``ids`` (n, seqlen)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in tqdm(ids, desc=desc, unit="window", disable=not progress, leave=False):
        x = row[None].to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, x[0, 1:], reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite NLL in {desc}: the quantized model produced NaN/inf logits")
        total += float(nll.double())
        count += x.shape[1] - 1
    return total, count


#: Row ``method@B``: that codebook method rebuilt from the file's statistics at exactly B effective
#: bits; in generation mode also ``method@B/V`` (values at V bits) and ``kivi@B[/V]``.
_AT_BITS = re.compile(r"^(?P<method>[a-z-]+)@(?P<bits>[0-9]+(?:\.[0-9]+)?)(?:/(?P<bits_v>[1-8]))?$")


def row_value_bits(name: str) -> int | None:
    """Value bits a generation-mode row names (``…/V``), else None."""
    m = _AT_BITS.match(name)
    return int(m["bits_v"]) if m and m["bits_v"] else None


def make_rows(names: list[str], codebooks: Codebooks | None, seqlen: int | None = None,
              generation: bool = False) -> dict[str, Quantizer | Codebooks | None]:
    """Quantizers for row names: ``fp``; baselines (``int8``, ``int4-channel``, ``fp8``, ``fp4``…);
    codebook methods (``lambda``, ``lambda-lloyd``, ``lloydmax``, ``uniform``) rebuilt from the
    statistics in ``codebooks`` at its bits (the file's own method is used as is); ``method@B``
    (e.g. ``lambda@2``) that method at exactly B effective bits per q/k entry at ``seqlen``, its
    code bits allocated over query and key channels as ``kvquant calibrate --effective-bits B
    --budget-sides qk`` would (:meth:`Codebooks.at_effective_bits`).

    ``generation=True`` (rows for a KV cache, queries exact): ``method@B[/V]`` spreads the budget
    over the key channels only (``budget_sides="k"``: B effective bits per key entry) and names
    the value bits V (:func:`row_value_bits`); ``kivi@B[/V]`` is the KIVI-style INT cache
    (:func:`kvquant.baselines.kivi_codebooks`: B-bit min–max keys per channel over the codebooks'
    groups, post-RoPE, fp16 scales, no sink); ``quanto@B`` / ``hqq@B`` transformers' own
    ``QuantizedCache`` (:class:`kvquant.generation.LibraryCache`, K and V at B bits). Classic
    baselines quantize inside attention only and are refused there."""
    rows: dict[str, Quantizer | Codebooks | None] = {}
    for name in names:
        at_bits = _AT_BITS.match(name)
        if at_bits and at_bits["bits_v"] and not generation:
            raise ValueError(f"row {name!r}: /V (value bits) is for a KV cache: use --mode generation")
        if name == "fp":
            rows[name] = None
        elif is_baseline(name):
            if generation:
                raise ValueError(f"--mode generation runs rows through a KV cache; {name} quantizes inside attention "
                                 "only (use --mode simulated for it, or kivi@B for the KIVI-style INT cache)")
            rows[name] = Baseline(name)
        elif generation and at_bits and at_bits["method"] in ("quanto", "hqq") and not at_bits["bits_v"]:
            from kvquant.generation import LibraryCache

            rows[name] = LibraryCache(at_bits["method"], int(float(at_bits["bits"])))
        elif generation and at_bits and at_bits["method"] == "kivi":
            if codebooks is None:
                raise ValueError(f"row {name!r} takes its group size from the codebooks: pass --codebooks FILE")
            from kvquant.baselines import kivi_codebooks

            rows[name] = kivi_codebooks(codebooks, float(at_bits["bits"]))
        elif name in METHODS or (at_bits and at_bits["method"] in METHODS):
            if codebooks is None:
                raise ValueError(f"row {name!r} needs calibration statistics: pass --codebooks FILE")
            if at_bits:
                if not seqlen:
                    raise ValueError(f"row {name!r} (exactly {at_bits['bits']} effective bits) needs the evaluation seqlen")
                sides = "k" if generation else "qk"  # a cache's queries are exact; the simulation quantizes both
                rows[name] = codebooks.at_effective_bits(float(at_bits["bits"]), seqlen, method=at_bits["method"],
                                                         budget_sides=sides)
            else:
                rows[name] = codebooks if name == codebooks.config.method else codebooks.rebuilt(method=name)
        else:
            raise ValueError(
                f"unknown row {name!r}; use fp, int2..int8, int2-channel..int8-channel, fp8, fp4, "
                f"a codebook method ({', '.join(METHODS)}) or METHOD@BITS (e.g. lambda@2)"
                + ("; in generation mode METHOD@BITS/VBITS, kivi@BITS[/VBITS], quanto@BITS, hqq@BITS" if generation else "")
            )
    return rows


def effective_bits(quantizer: Quantizer | None, head_dim: int, seqlen: int, dtype: torch.dtype) -> float:
    """Bits per q/k entry: the dtype's for ``fp``, else the quantizer's own count."""
    if quantizer is None:
        return float(torch.finfo(dtype).bits)
    return float(quantizer.effective_bits(head_dim=head_dim, seqlen=seqlen))


def evaluate(model: torch.nn.Module, windows, rows: dict[str, Quantizer | None], progress: bool = True) -> dict[str, PplRow]:
    """Perplexity of every row on the same windows (n, seqlen), in the order given."""
    ids = getattr(windows, "ids", windows)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError("perplexity needs at least one window of >= 2 tokens")
    from kvquant.fingerprint import ModelFingerprint

    head_dim = ModelFingerprint.from_model(model).head_dim
    dtype = next(model.parameters()).dtype
    out: dict[str, PplRow] = {}
    for name, quantizer in tqdm(rows.items(), desc="rows", unit="row", disable=not progress):
        t0 = time.perf_counter()
        with wrapped(model, quantizer):
            total, count = nll_sum(model, ids, progress, desc=name)
        out[name] = PplRow(name, math.exp(total / count), total / count, count,
                           effective_bits(quantizer, head_dim, ids.shape[1], dtype), time.perf_counter() - t0)
    return out


def format_table(rows: dict[str, PplRow], ref: str = "fp") -> str:
    """Markdown table: row, effective bits (generation mode: K/V bits and bytes per token the
    cache holds), perplexity, change vs ``ref``."""
    base = rows[ref].ppl if ref in rows else None
    kv = any(r.kv_bytes_per_token is not None for r in rows.values())
    lines = (["| row | K/V bits held | bytes/token | ppl | Δ vs fp |", "|---|---|---|---|---|"] if kv else
             ["| row | eff. bits (q,k) | ppl | Δ vs fp |", "|---|---|---|---|"])
    for r in rows.values():
        delta = f"{(r.ppl / base - 1):+.2%}" if base else "–"
        held = f" {r.kv_bytes_per_token:.0f} |" if kv else ""
        lines.append(f"| {r.name} | {r.effective_bits:.2f} |{held} {r.ppl:.3f} | {delta} |")
    return "\n".join(lines)
