"""Perplexity vs bits on a real model: unquantized, classic quantizers and kvquant codebooks.

One process, one model, the same evaluation windows for every row. Calibration statistics are
captured once on windows from the END of the corpus; every codebook method and bit width is
built from them. Evaluation uses the FIRST windows of the corpus (disjoint). Codebook rows come
twice: with the seed paper's static per-head normalisation (μ, σ from calibration) and as
kvquant's default (``kvquant.cli.DEFAULTS``: dynamic min–max per channel group, sink tokens
exact, pre-RoPE, code bits allocated per channel so that every row has exactly b effective bits).
Also computes the per-head attention-logit error on one evaluation window (post-RoPE rows).

Usage:  python eval/ppl_table.py [--model smollm2-135m] [--seqlen 2048] [--calib 16] [--windows 8]
                                 [--bits 8,4,3,2] [--name smollm2]
Writes out/ppl_<name>.json and the section ``ppl-<name>`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvquant.io.assets import load_model
from kvquant.evaluation.baselines import Baseline
from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.cli import DEFAULTS, calibration_config
from kvquant.codebooks import CodebookConfig
from kvquant.io.data import load_text, split_calib_eval
from kvquant.evaluation.diagnostics import logit_errors
from kvquant.io.fileio import replace_section, write_text
from kvquant.io.fingerprint import ModelFingerprint
from kvquant.evaluation.perplexity import evaluate
from kvquant.core.scalar import METHODS

ROOT = Path(__file__).resolve().parents[1]


#: codebook methods shown with the default (dynamic) normalisation
DEFAULT_NORM_METHODS = ("lambda", "lambda-lloyd")


def rows_for_bits(bits: int, static, books, seqlen: int) -> dict:
    """Baselines, every method with static per-head σ, post-RoPE (``name@bits``, rebuilt from
    ``static``), and the default configuration's density codebooks at exactly ``bits`` effective
    bits (``name@bits/default``, rebuilt from ``books``)."""
    rows = {f"int{bits}": Baseline(f"int{bits}"), f"int{bits}-channel": Baseline(f"int{bits}-channel")}
    if bits in (8, 4):
        rows[f"fp{bits}"] = Baseline(f"fp{bits}")
    for m in METHODS:
        rows[f"{m}@{bits}"] = static.rebuilt(method=m, bits_q=bits, bits_k=bits)
    for m in DEFAULT_NORM_METHODS:
        c = books.config.at_effective_bits(bits, books.fingerprint.head_dim, seqlen)
        rows[f"{m}@{bits}/default"] = books.rebuilt(method=m, bits_q=c.bits_q, bits_k=c.bits_k, budget=c.budget)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--dataset", default="enwiki-excerpt")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (end of corpus)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows (start of corpus)")
    ap.add_argument("--bits", default="8,4,3,2")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)  # the float32 tables of BENCHMARKS.md
    calib, evals = split_calib_eval(tok, load_text(args.dataset), args.seqlen, args.calib, args.windows, source=args.dataset)
    default = calibration_config(DEFAULTS, ModelFingerprint.from_model(model).head_dim, args.seqlen, set(DEFAULTS))
    books = calibrate(model, calib, CalibrationConfig(default))  # with Fisher weights (allocation)
    static = calibrate(model, calib, CalibrationConfig(CodebookConfig("lambda", 4, 4, "head")))  # post-RoPE
    bits_list = [int(b) for b in args.bits.split(",")]
    by_bits = {b: rows_for_bits(b, static, books, args.seqlen) for b in bits_list}
    rows = {"fp": None} | {n: q for r in by_bits.values() for n, q in r.items()}
    results = evaluate(model, evals, rows)
    err_quant = {n: q for b in (8, 4) for n, q in by_bits.get(b, {}).items()
                 if getattr(q, "rope", "post") == "post"}  # logit errors are measured post-RoPE
    errors = logit_errors(model, evals.ids[:1], err_quant)
    command = "python eval/ppl_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "command": command.strip(), "model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
        "calib_windows": calib.n, "eval_windows": evals.n, "bos_prepended": evals.bos_prepended,
        "dtype": "float32", "default_config": asdict(books.config), "seconds": time.perf_counter() - t0,
        "rows": {k: v.to_dict() for k, v in results.items()},
        "logit_error_mean": {k: float(v.mean()) for k, v in errors.items()},
        "logit_error_per_head": {k: v.tolist() for k, v in errors.items()},
    }
    write_text(ROOT / "out" / f"ppl_{args.name}.json", json.dumps(payload, indent=1))
    md = markdown(payload, bits_list, errors)
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", f"ppl-{args.name}", md)


def markdown(p: dict, bits_list: list[int], errors: dict) -> str:
    rows = p["rows"]
    fp = rows["fp"]["ppl"]
    d = p["default_config"]
    cols = ["int{b}", "int{b}-channel", "fp{b}"] + [f"{m}@{{b}}" for m in METHODS] + [f"{m}@{{b}}/default" for m in DEFAULT_NORM_METHODS]
    heads = (["INT per token", "INT per channel (G=128)", "FP per token"] + [f"{m} (static/head)" for m in METHODS]
             + [f"{m} (default norm)" for m in DEFAULT_NORM_METHODS])
    out = [
        f"## Perplexity: {p['model']}, {p['dataset']}, seqlen {p['seqlen']}",
        "",
        f"Command: `{p['command']}` — {p['eval_windows']} evaluation windows (first of the corpus), "
        f"{p['calib_windows']} calibration windows (last of the corpus), {p['dtype']}, Q and K both quantized "
        f"(post-RoPE but for the default rows). BOS prepended: {p['bos_prepended']}. Unquantized perplexity **{fp:.3f}**. "
        "Cells: ppl (Δ vs unquantized) [effective bits per entry]. INT/FP per token add a fp16 scale per token; "
        "INT per channel an fp16 scale and zero per channel and 128 tokens. `static/head`: codebook on x̃ = (x − μ)/σ "
        "with μ, σ per head from calibration (the seed paper; nothing added per entry). `default norm`: "
        f"kvquant's default — norm `{d['norm']}`, group {d['group']} with {d.get('scale_bits', 16)}-bit scales, "
        f"first {d['sink']} token(s) exact"
        + (f", {d.get('outliers', 0):g} of the entries kept exact as outliers" if d.get("outliers") else "")
        + f", {d.get('rope', 'post')}-RoPE — with the codebook shaped by the calibration histogram"
        + (", code bits allocated per channel so that the row has exactly b effective bits" if d.get("budget") else "")
        + "; every scale and exact entry counted. Logit errors are listed for post-RoPE quantizers only.",
        "",
        "| bits | " + " | ".join(heads) + " |",
        "|" + "---|" * (len(heads) + 1),
    ]
    for b in bits_list:
        cells = []
        for c in cols:
            r = rows.get(c.format(b=b))
            cells.append("–" if r is None else f"{r['ppl']:.3f} ({r['ppl'] / fp - 1:+.1%}) [{r['effective_bits']:.2f}b]")
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    out += ["", ("Attention-logit error ‖Q̂K̂ᵀ−QKᵀ‖/‖QKᵀ‖ over allowed pairs (first evaluation window): mean over "
                "heads, and the fraction of heads where each density codebook's error is lower than this quantizer's:"), ""]
    dens = [n for n in errors if n.startswith("lambda@") or n.endswith("/default")]
    out.append("| quantizer | mean rel. error | " + " | ".join(f"heads where {n} is lower" for n in dens) + " |")
    out.append("|" + "---|" * (len(dens) + 2))
    for name, e in errors.items():
        fr = ["" if n == name else f"{float((errors[n] < e).double().mean()):.0%}" for n in dens]
        out.append(f"| {name} | {float(e.mean()):.4f} | " + " | ".join(fr) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
