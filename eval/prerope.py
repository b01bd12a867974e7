"""Pre-RoPE vs post-RoPE quantization of queries and keys.

RoPE rotates channel pair (j, j + D/2) of the token at position p by angle p·θ_j. Post-RoPE
quantizes the rotated entries; pre-RoPE (``CodebookConfig(rope="pre")``, :mod:`kvquant.core.rope`)
undoes the rotation inside the attention call with the model's own (cos, sin), quantizes, and
rotates back. A channel's pre-RoPE values do not spin with the position, so its range over a
group of tokens is narrower (the outlier channels of keys stay put — KVQuant's observation).
Calibration statistics and histograms are captured in the same frame as the quantizer.

Rows (bits 4, 3, 2): INT per channel (G=128) and the channel-group codebooks with the first
token exact (uniform, lambda, lambda-lloyd), each post- and pre-RoPE, on the perplexity
protocol's forward passes (no KV cache — pre-RoPE keys from a cache are not supported).

Usage:  python eval/prerope.py [--model smollm2-135m] [--name smollm2] [--seqlen 2048] [--calib 8]
                              [--windows 4] [--bits 4,3,2]
Writes out/prerope_<name>.json, docs/prerope_<name>.png (perplexity vs effective bits) and the
``prerope-<name>`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from figures import ppl_figure

from kvquant.io.assets import load_model
from kvquant.evaluation.baselines import Baseline
from kvquant.hf.calibrate import capture
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.io.data import load_text, split_calib_eval
from kvquant.io.fileio import replace_section, write_text
from kvquant.io.fingerprint import ModelFingerprint
from kvquant.evaluation.perplexity import evaluate

ROOT = Path(__file__).resolve().parents[1]
GROUP, SINK = 128, 1
METHODS = ("uniform", "lambda", "lambda-lloyd")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="smollm2", help="suffix of the output files and BENCHMARKS.md section")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--bits", default="4,3,2")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)  # the float32 tables of BENCHMARKS.md
    calib, evals = split_calib_eval(tok, load_text("enwiki-excerpt"), args.seqlen, args.calib, args.windows,
                                    source="enwiki-excerpt")
    fp = ModelFingerprint.from_model(model)
    frames = {rope: capture(model, calib, [(GROUP, SINK)], rope=rope) for rope in ("post", "pre")}
    bits_list = [int(b) for b in args.bits.split(",")]
    rows: dict = {"fp": None}
    for b in bits_list:
        for frame, (stats, hists) in frames.items():
            rows[f"int{b}-channel/{frame}"] = Baseline(f"int{b}-channel", rope=frame)
            for m in METHODS:
                config = CodebookConfig(m, b, b, "channel-group", GROUP, SINK, rope=frame)
                rows[f"{m}@{b}/{frame}"] = Codebooks.from_stats(stats, config, fp, {}, hists[(GROUP, SINK, 0.0, 16)])
    results = evaluate(model, evals, rows)
    command = ("python eval/prerope.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    payload = {"command": command, "model": args.model, "dataset": "enwiki-excerpt", "seqlen": args.seqlen,
               "calib_windows": calib.n, "eval_windows": evals.n, "dtype": "float32",
               "seconds": time.perf_counter() - t0, "rows": {k: v.to_dict() for k, v in results.items()}}
    write_text(ROOT / "out" / f"prerope_{args.name}.json", json.dumps(payload, indent=1))
    plot(payload, ROOT / "docs" / f"prerope_{args.name}.png")
    md = markdown(payload, bits_list)
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", f"prerope-{args.name}", md)


def plot(p: dict, path: Path) -> None:
    """Perplexity (log) vs effective bits: one line per quantizer, solid pre-RoPE, dashed post-RoPE."""
    rows = p["rows"]
    with ppl_figure(p, path, "effective bits per q/k entry (group scales and exact sink tokens counted)", "",
                    (8, 5.5), fontsize=7) as (ax, plt):
        for i, (label, prefix) in enumerate([("INT per channel", "int")] + [(f"{m} / chgroup+sink", f"{m}@") for m in METHODS]):
            for frame in ("post", "pre"):
                pts = sorted((r["effective_bits"], r["ppl"]) for k, r in rows.items()
                             if k.startswith(prefix) and k.endswith(f"/{frame}") and (prefix != "int" or "-channel" in k))
                ax.plot(*zip(*pts), marker="o", markersize=4, color=plt.cm.tab10(i), label=f"{label}, {frame}-RoPE",
                        linestyle="-" if frame == "pre" else "--")


def markdown(p: dict, bits_list: list[int]) -> str:
    rows, fp = p["rows"], p["rows"]["fp"]["ppl"]
    def cell(r: dict) -> str:
        return f"{r['ppl']:.3f} ({r['ppl'] / fp - 1:+.1%})"

    names = [("INT per channel", "int{b}-channel")] + [(f"{m} / chgroup+sink", f"{m}@{{b}}") for m in METHODS]
    out = [
        f"## Pre-RoPE vs post-RoPE quantization: {p['model']}, {p['dataset']}, seqlen {p['seqlen']}",
        "",
        (f"Command: `{p['command']}` — {p['eval_windows']} evaluation windows (first of the corpus), "
        f"{p['calib_windows']} calibration windows (last), {p['dtype']}, Q and K both quantized. Unquantized "
        f"perplexity **{fp:.3f}**. `pre`: the rotation is undone inside the attention call, the entries are "
        "quantized, and rotated back (codebooks from pre-RoPE calibration histograms); effective bits are the "
        f"same in both frames (group {GROUP}, first {SINK} token exact for the codebook rows). Cells: ppl (Δ)."),
        "",
        "| quantizer | " + " | ".join(f"{b} bits post-RoPE | {b} bits pre-RoPE" for b in bits_list) + " |",
        "|" + "---|" * (2 * len(bits_list) + 1),
    ]
    for label, key in names:
        cells = []
        for b in bits_list:
            k = key.format(b=b)
            cells += [cell(rows[f"{k}/post"]), cell(rows[f"{k}/pre"])]
        bits = rows[f"{key.format(b=bits_list[0])}/post"]["effective_bits"]
        out.append(f"| {label} [{bits - bits_list[0]:+.3f}b over b] | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
