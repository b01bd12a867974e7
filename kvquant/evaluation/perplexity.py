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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvquant.codebooks import Codebooks
from kvquant.core.scalar import METHODS
from kvquant.evaluation.baselines import Baseline, is_baseline
from kvquant.evaluation.divergence import Agreement, log_probs
from kvquant.hf.attention import Quantizer
from kvquant.hf.placement import input_device
from kvquant.hf.wrap import attention_modules, wrapped


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
    kv_bytes_per_token: float | None = None  # generation mode: bytes the cache holds per token (kvquant.evaluation.generation)
    kv_bits_end: float | None = None  # generation mode: K/V bits held at the window's end (effective_bits: the mean)
    kv_bits_max: float | None = None  # … and the largest after any token of the window
    kld: float | None = None  # mean KL(p_fp ‖ p_row) per predicted token, nats (kvquant.evaluation.divergence); None: no fp row
    kld_p99: float | None = None  # its 99th percentile over predicted tokens
    top1: float | None = None  # share of predicted tokens whose most likely next token is fp's

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def nll_sum(model: torch.nn.Module, ids: torch.Tensor, progress: bool = True, desc: str = "ppl") -> tuple[float, int]:
    """Σ NLL (nats, float64) and number of predicted tokens over windows ``ids`` (n, seqlen)."""
    device = input_device(model)
    total, count = 0.0, 0
    for row in tqdm(ids, desc=desc, unit="window", disable=not progress, leave=False):
        x = row[None].to(device)
        total += chunk_nll(model(x, use_cache=False).logits[0, :-1], x[0, 1:], desc)
        count += x.shape[1] - 1
    return total, count


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor, desc: str = "ppl") -> float:
    """Σ NLL (nats, float64) of ``targets`` (n,) under ``logits`` (n, vocab); NaN/inf is an error."""
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    if not torch.isfinite(nll):
        raise FloatingPointError(f"non-finite NLL in {desc}: the model produced NaN/inf logits")
    return float(nll.double())


def first_nonfinite_layer(model: torch.nn.Module, run: Callable[[], object]) -> int | None:
    """Index of the first attention layer whose output holds NaN/inf while ``run()`` runs the model
    (forward hooks on :func:`kvquant.hf.wrap.attention_modules`), or None."""
    found: list[int] = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if not found and torch.is_tensor(out) and not torch.isfinite(out).all():
            found.append(int(module.layer_idx))

    handles = [m.register_forward_hook(hook) for m in attention_modules(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _nonfinite_error(model, runs, name: str, reference: str | None, x: torch.Tensor, window: int) -> FloatingPointError:
    """Where a row's NaN/inf logits arise: its first attention layer with NaN/inf output, and whether
    the unquantized reference itself is to blame."""
    layer = first_nonfinite_layer(model, lambda: [None for _ in runs[name](x)])
    where = f"from attention layer {layer} on" if layer is not None else "after the last attention layer"
    dtype = next(model.parameters()).dtype
    if name == reference:
        return FloatingPointError(
            f"the unquantized model ({name}) gives NaN/inf logits on evaluation window {window}, {where}: it overflows "
            f"on this text in {str(dtype).removeprefix('torch.')} before any quantization; try --dtype float32")
    return FloatingPointError(f"row {name} gives NaN/inf logits on evaluation window {window}, {where} "
                              f"(the unquantized reference is finite there): its quantized attention produced them")


#: A row's logits on one window ``x`` (1, n): yields ``(a, logits)``, the logits (m, vocab) at
#: positions a … a+m−1, covering 0 … n−1 in order (one chunk, or several through a KV cache).
WindowLogits = Callable[[torch.Tensor], Iterator[tuple[int, torch.Tensor]]]


@dataclass
class RowScore:
    """What :func:`score_windows` accumulates for one row."""

    nll: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    agreement: Agreement | None = None

    def row(self, name: str, effective_bits: float, **extra) -> PplRow:
        kld = self.agreement.summary() if self.agreement else (None, None, None)
        return PplRow(name, math.exp(self.nll / self.tokens), self.nll / self.tokens, self.tokens, effective_bits,
                      self.seconds, kld=kld[0], kld_p99=kld[1], top1=kld[2], **extra)


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows, runs: dict[str, WindowLogits], reference: str | None = "fp",
                  progress: bool = True) -> dict[str, RowScore]:
    """Σ NLL of every row on the same windows (n, seqlen), windows outer, rows inner: for each
    window the ``reference`` row (if among ``runs``) runs first and its log-probabilities — one
    window's, float32 (seqlen × vocab × 4 bytes) — are what every other row's KL divergence and
    top-token agreement (:class:`kvquant.evaluation.divergence.Agreement`) are measured against; only that
    one window's reference is ever held."""
    ids = getattr(windows, "ids", windows)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError("perplexity needs at least one window of >= 2 tokens")
    device = input_device(model)
    order = sorted(runs, key=lambda name: name != reference)  # the reference first, then as given
    scores = {name: RowScore(agreement=Agreement() if reference in runs else None) for name in runs}
    bar = tqdm(total=len(ids) * len(runs), desc="windows × rows", unit="pass", disable=not progress)
    for i, row in enumerate(ids):
        x = row[None].to(device)
        n = x.shape[1]
        ref: list[torch.Tensor] = []  # the reference row's log-probs (n − 1, vocab), once it has run
        for name in order:
            s, t0 = scores[name], time.perf_counter()
            bar.set_postfix_str(name)
            for a, logits in runs[name](x):
                logits = logits[: n - 1 - a]  # the last position predicts nothing
                if not logits.shape[0]:
                    continue
                try:
                    s.nll += chunk_nll(logits, x[0, a + 1 : a + 1 + logits.shape[0]], f"row {name} at tokens {a}–")
                except FloatingPointError:
                    raise _nonfinite_error(model, runs, name, reference, x, i) from None
                if name == reference:
                    ref.append(log_probs(logits))
                elif s.agreement is not None:
                    s.agreement.add(ref[0][a : a + logits.shape[0]], logits)
            if name == reference:
                ref = [torch.cat(ref)]
                s.agreement.add_same(n - 1)
            s.tokens += n - 1
            s.seconds += time.perf_counter() - t0
            bar.update()
    bar.close()
    return scores


#: Row ``method@B``: that codebook method rebuilt from the file's statistics at exactly B effective
#: bits; in generation mode also ``method@B/V`` (values at V bits) and ``kivi@B[/V]``.
_AT_BITS = re.compile(r"^(?P<method>[a-z-]+)@(?P<bits>[0-9]+(?:\.[0-9]+)?)(?:/(?P<bits_v>[1-8]))?$")


def row_value_bits(name: str) -> int | None:
    """Value bits a generation-mode row names (``…/V``), else None."""
    m = _AT_BITS.match(name)
    return int(m["bits_v"]) if m and m["bits_v"] else None


class CodebooksRequired(ValueError):
    """A row that is built from a codebook file's statistics, asked for without one."""


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
    (:func:`kvquant.evaluation.baselines.kivi_codebooks`: B-bit min–max keys per channel over the codebooks'
    groups, post-RoPE, fp16 scales, no sink); ``quanto@B`` / ``hqq@B`` transformers' own
    ``QuantizedCache`` (:class:`kvquant.evaluation.library_cache.LibraryCache`, K and V at B bits). Classic
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
            from kvquant.evaluation.library_cache import LibraryCache

            bits = float(at_bits["bits"])
            if bits != int(bits):
                raise ValueError(f"row {name!r}: {at_bits['method']}@B takes whole bits (e.g. {at_bits['method']}@4)")
            rows[name] = LibraryCache(at_bits["method"], int(bits))
        elif generation and at_bits and at_bits["method"] == "kivi":
            if codebooks is None:
                raise CodebooksRequired(f"row {name!r} takes its group size from the codebooks: pass --codebooks FILE")
            from kvquant.evaluation.baselines import kivi_codebooks

            rows[name] = kivi_codebooks(codebooks, float(at_bits["bits"]))
        elif name in METHODS or (at_bits and at_bits["method"] in METHODS):
            if codebooks is None:
                raise CodebooksRequired(f"row {name!r} needs calibration statistics: pass --codebooks FILE")
            if at_bits:
                if not seqlen:
                    raise ValueError(f"row {name!r} (exactly {at_bits['bits']} effective bits) needs the evaluation seqlen")
                sides = "k" if generation else "qk"  # a cache's queries are exact; the simulation quantizes both
                try:
                    rows[name] = codebooks.at_effective_bits(float(at_bits["bits"]), seqlen, method=at_bits["method"],
                                                             budget_sides=sides)
                except ValueError as e:
                    raise ValueError(f"row {name!r}: {e}") from None
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
    """Perplexity of every row on the same windows (n, seqlen), one forward pass per window and
    row (the simulated path), in the order given; with an ``fp`` row also every row's KL divergence
    from it and top-token agreement (:func:`score_windows`)."""
    from kvquant.io.fingerprint import ModelFingerprint

    head_dim = ModelFingerprint.from_model(model).head_dim
    dtype = next(model.parameters()).dtype
    ids = getattr(windows, "ids", windows)

    def run(quantizer: Quantizer | None) -> WindowLogits:
        def logits(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
            with wrapped(model, quantizer):
                out = model(x, use_cache=False).logits[0]
            yield 0, out

        return logits

    scores = score_windows(model, ids, {name: run(q) for name, q in rows.items()}, progress=progress)
    return {name: scores[name].row(name, effective_bits(q, head_dim, ids.shape[1], dtype)) for name, q in rows.items()}


def format_table(rows: dict[str, PplRow], ref: str = "fp") -> str:
    """Markdown table: row, effective bits (generation mode: K/V bits and bytes per token the
    cache holds), perplexity, change vs ``ref``; with KL divergences measured, the mean KLD (nats),
    its 99th percentile and the top-token agreement."""
    base = rows[ref].ppl if ref in rows else None
    kv = any(r.kv_bytes_per_token is not None for r in rows.values())
    kld = any(r.kld is not None for r in rows.values())
    head = ["row", *(["K/V bits held (mean / end / max)", "bytes/token (end)"] if kv else ["eff. bits (q,k)"]),
            "ppl", "Δ vs fp",
            *(["KLD", "KLD p99", "top-1"] if kld else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows.values():
        bits = (f"{r.effective_bits:.2f} / {r.kv_bits_end:.2f} / {r.kv_bits_max:.2f}" if r.kv_bits_end is not None
                else f"{r.effective_bits:.2f}")
        cells = [r.name, bits, *([f"{r.kv_bytes_per_token:.0f}"] if kv else []), f"{r.ppl:.3f}",
                 f"{(r.ppl / base - 1):+.2%}" if base else "–"]
        if kld:
            cells += ([f"{r.kld:.5f}", f"{r.kld_p99:.4f}", f"{r.top1:.2%}"] if r.kld is not None else ["–"] * 3)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
