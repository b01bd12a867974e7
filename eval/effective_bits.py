"""At exactly b effective bits: sink tokens, group size and bit allocation (BENCHMARKS.md "At exactly b effective bits").

Pre-RoPE channel-group codebooks (the default family) with every bit counted — codes, the
(mid, half) per channel and group (32/G in fp16, 16/G with 8-bit scales), exact sink tokens
(16 bits each). Bit allocation (``CodebookConfig.budget``, :mod:`kvquant.core.allocate`) spreads a
fractional code budget over the (layer, head, channel, side) units by reverse water-filling on
the diagonal-Fisher estimate of the calibration loss increase — each channel gets 2, 3, 4, 5, 8,
… levels (3 and 5 packed at 1.6 and 2.33 bits) — so configurations with different
overheads can be compared at the same effective bits: ``budget = code_bits(b)`` makes the
effective bits exactly b (up to the granularity of one channel's bit).

Protocol (nothing is chosen on the evaluation windows):
1. Calibrate once on the LAST ``--calib`` windows: statistics and Fisher-weighted histograms for
   every (G, sink, scale bits) candidate (one forward + backward per window).
2. Select, per bit width, the (G, sink, scale bits, method) with the lowest perplexity at exactly b effective
   bits on ``--dev`` development windows: the windows right after the evaluation windows
   (disjoint from both calibration and evaluation).
3. Evaluate on the FIRST ``--windows`` windows: the selected configuration at exactly b bits,
   at b code bits on average allocated, and with every channel at b code bits (the last two at the
   same effective bits, b + overhead: what allocation alone buys), the same three for the
   uniform (min–max INT) codebook on the selected normalisation, and a fixed reference
   (G 128, sink 1, fp16 scales, lambda-lloyd, b code bits).

Usage:  python eval/effective_bits.py [--seqlen 2048] [--calib 8] [--dev 2] [--windows 4] [--bits 4,3,2]
        [--model smollm2-135m] [--name smollm2]
Writes out/effective_bits_<name>.json and the ``effective-bits-<name>`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvquant.io.assets import load_model
from kvquant.hf.calibrate import capture
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.io.data import load_text, split_calib_eval
from kvquant.io.fileio import replace_section, write_text
from kvquant.io.fingerprint import ModelFingerprint
from kvquant.evaluation.perplexity import evaluate

ROOT = Path(__file__).resolve().parents[1]
#: (group, sink, scale bits) candidates; methods selected among these.
CANDIDATES = [(128, 1, 16), (128, 1, 8), (64, 1, 8), (64, 4, 8), (32, 1, 8)]
METHODS = ("lambda", "lambda-lloyd")
REFERENCE = (128, 1, 16, "lambda-lloyd")  # fp16 scales, every channel at b code bits (no allocation)


def books_at(stats, hists, fp, group: int, sink: int, scale_bits: int, method: str, bits: int, seqlen: int,
             mode: str) -> Codebooks:
    """Codebooks of (group, sink, scale_bits, method) at ``bits``: ``mode`` "exact" — allocated so
    that the effective bits are exactly ``bits``; "alloc" — ``bits`` code bits on average,
    allocated; "equal" — every channel at ``bits`` code bits."""
    config = CodebookConfig(method, bits, bits, "channel-group", group, sink, rope="pre", scale_bits=scale_bits)
    if mode == "exact":
        config = config.at_effective_bits(bits, fp.head_dim, seqlen)
    elif mode == "alloc":  # b code bits on average: the effective bits of b code bits everywhere
        config = config.at_effective_bits(config.effective_bits(bits, fp.head_dim, seqlen), fp.head_dim, seqlen)
    return Codebooks.from_stats(stats, config, fp, {}, hists[(group, sink, 0.0, scale_bits)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="smollm2")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)  # the float32 tables of BENCHMARKS.md
    text = load_text("enwiki-excerpt")
    calib, evals = split_calib_eval(tok, text, args.seqlen, args.calib, args.windows + args.dev, source="enwiki-excerpt")
    dev, evals = evals.ids[args.windows:], evals.ids[: args.windows]
    fp = ModelFingerprint.from_model(model)
    stats, hists = capture(model, calib, [(g, s, 0.0, sb) for g, s, sb in CANDIDATES], rope="pre", fisher=True)
    bits_list = [int(b) for b in args.bits.split(",")]
    selection, rows = {}, {"fp": None}
    dev_fp = evaluate(model, dev, {"fp": None}, progress=False)["fp"].ppl
    for b in bits_list:
        reachable = [c for c in CANDIDATES  # the scales and sinks alone may cost more than b
                     if CodebookConfig("lambda", 8, 8, "channel-group", c[0], c[1], scale_bits=c[2])
                     .code_bits(b, fp.head_dim, args.seqlen) >= 1]
        specs = {f"G{g}/sink{s}/{sb}-bit scales/{m}": (g, s, sb, m) for g, s, sb in reachable for m in METHODS}
        dev_rows = evaluate(model, dev, {name: books_at(stats, hists, fp, *spec, b, args.seqlen, "exact")
                                         for name, spec in specs.items()})
        best = min(dev_rows, key=lambda k: dev_rows[k].ppl)
        selection[str(b)] = {"best": best, "dev": {k: v.to_dict() for k, v in dev_rows.items()}}
        g, s, sb, m = specs[best]
        for name, method in (("selected", m), ("uniform", "uniform")):
            for mode in ("exact", "alloc", "equal"):
                rows[f"{b}/{name}/{mode}"] = books_at(stats, hists, fp, g, s, sb, method, b, args.seqlen, mode)
        rows[f"{b}/reference/equal"] = books_at(stats, hists, fp, *REFERENCE, b, args.seqlen, "equal")
    results = evaluate(model, evals, rows)
    command = ("python eval/effective_bits.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    payload = {"command": command, "model": args.model, "dataset": "enwiki-excerpt", "seqlen": args.seqlen,
               "calib_windows": calib.n, "dev_windows": int(dev.shape[0]), "eval_windows": int(evals.shape[0]),
               "dtype": "float32", "seconds": time.perf_counter() - t0, "dev_fp_ppl": dev_fp, "selection": selection,
               "rows": {k: v.to_dict() for k, v in results.items()}}
    write_text(ROOT / "out" / f"effective_bits_{args.name}.json", json.dumps(payload, indent=1))
    md = markdown(payload, bits_list)
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", f"effective-bits-{args.name}", md)


def markdown(p: dict, bits_list: list[int]) -> str:
    rows, fp = p["rows"], p["rows"]["fp"]["ppl"]

    def cell(r: dict) -> str:
        return f"{r['ppl']:.3f} ({r['ppl'] / fp - 1:+.1%}) [{r['effective_bits']:.3f}b]"

    out = [
        f"## At exactly b effective bits: sinks, group size, bit allocation: {p['model']}, "
        f"{p['dataset']}, seqlen {p['seqlen']}",
        "",
        (f"Command: `{p['command']}` — pre-RoPE channel-group codebooks, Q and K both quantized, {p['dtype']}. "
         f"Calibration (statistics + Fisher-weighted histograms): last {p['calib_windows']} windows; selection of "
         f"(G, sink, scale bits, method) at exactly b effective bits on {p['dev_windows']} development windows (right after the "
         f"evaluation windows); evaluation on the first {p['eval_windows']} windows. Unquantized perplexity "
         f"**{fp:.3f}**. `exact b`: code budget spread over (layer, head, channel, side) by water-filling so that the "
         "effective bits are b; `allocated`: the same with b code bits on average (effective b + scales + sinks); "
         "`every channel`: every channel at b bits (same effective bits). Cells: ppl (Δ) [effective bits]."),
        "",
        "| row | " + " | ".join(f"{b} bits" for b in bits_list) + " |",
        "|---|" + "---|" * len(bits_list),
    ]
    labels = [("selected, exact b", "selected/exact"),
              ("selected, b code bits on average, allocated", "selected/alloc"),
              ("selected, b code bits every channel", "selected/equal"),
              ("uniform (INT), selected normalisation, exact b", "uniform/exact"),
              ("uniform (INT), selected normalisation, b code bits on average, allocated", "uniform/alloc"),
              ("uniform (INT), selected normalisation, b code bits every channel", "uniform/equal"),
              ("reference (G128, sink 1, fp16 scales, lambda-lloyd), b code bits", "reference/equal")]
    out.append("| selected on dev | " + " | ".join(f"`{p['selection'][str(b)]['best']}`" for b in bits_list) + " |")
    for label, key in labels:
        out.append(f"| {label} | " + " | ".join(cell(rows[f"{b}/{key}"]) for b in bits_list) + " |")
    dev_fp = p.get("dev_fp_ppl")
    out += ["", "Development windows, every candidate at exactly b effective bits "
            + (f"(ppl, Δ vs unquantized {dev_fp:.3f} there):" if dev_fp else "(ppl):"), "",
            "| candidate | " + " | ".join(f"{b} bits" for b in bits_list) + " |", "|---|" + "---|" * len(bits_list)]
    cands = dict.fromkeys(c for b in bits_list for c in p["selection"][str(b)]["dev"])
    for cand in cands:
        dev = [p["selection"][str(b)]["dev"].get(cand) for b in bits_list]
        out.append(f"| {cand} | " + " | ".join(
            "n/a" if not r else f"{r['ppl']:.3f}" + (f" ({r['ppl'] / dev_fp - 1:+.1%})" if dev_fp else "") for r in dev) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
