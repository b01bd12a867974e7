"""Where the remaining error of the default family sits: what stands in the way.

Pre-RoPE channel-group codebooks (``lambda-lloyd``, G 128, first token exact), SmolLM2-135M,
the perplexity protocol's windows. Rows quantize only part of the model:
- queries only / keys only (3 and 2 bits) against both;
- both sides in one band of layers only (3 bits): is the error concentrated (then bit
  allocation can move it) or spread (then every head's quantizer has to get better)?
- the group size G ∈ {128, 64, 32} with the first token exact, 3 bits, lambda-lloyd and
  uniform: how much finer dynamic ranges buy, before their scale cost (32/G bits); and G 64 / 32
  with the scales stored in 8 bits each (``scale_bits=8``, 16/G bits; 3 and 2 bits).

Usage:  python eval/where_error.py [--seqlen 2048] [--calib 8] [--windows 4]
Writes out/where_error_smollm2.json and the ``where-error-smollm2`` section of BENCHMARKS.md.
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
GROUPS = (128, 64, 32)


class Part:
    """Apply ``books`` to one side (``"q"``, ``"k"`` or both) in ``layers`` only; the rest exact."""

    def __init__(self, books: Codebooks, sides: str, layers: range | None = None):
        self.books, self.sides, self.layers, self.rope = books, sides, layers, books.rope

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        if side not in self.sides or (self.layers is not None and layer not in self.layers):
            return x
        return self.books(x, layer, side)

    def effective_bits(self, head_dim: int, seqlen: int) -> float:
        return self.books.effective_bits(head_dim, seqlen)  # of the quantized part


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    calib, evals = split_calib_eval(tok, load_text("enwiki-excerpt"), args.seqlen, args.calib, args.windows,
                                    source="enwiki-excerpt")
    fp = ModelFingerprint.from_model(model)
    settings = [(g, 1, 0.0, 16) for g in GROUPS] + [(g, 1, 0.0, 8) for g in GROUPS[1:]]
    stats, hists = capture(model, calib, settings, rope="pre")

    def books(method: str, bits: int, group: int = 128, scale_bits: int = 16) -> Codebooks:
        config = CodebookConfig(method, bits, bits, "channel-group", group, 1, rope="pre", scale_bits=scale_bits)
        return Codebooks.from_stats(stats, config, fp, {}, hists[(group, 1, 0.0, scale_bits)])

    n = fp.num_layers
    bands = [range(0, 1), range(1, n // 3), range(n // 3, 2 * n // 3), range(2 * n // 3, n)]
    rows: dict = {"fp": None}
    for b in (3, 2):
        for sides in ("qk", "q", "k"):
            rows[f"sides {sides} @{b}"] = Part(books("lambda-lloyd", b), sides)
    for band in bands:
        rows[f"layers {band.start}-{band.stop - 1} @3"] = Part(books("lambda-lloyd", 3), "qk", band)
    for g in GROUPS:
        for m in ("lambda-lloyd", "uniform"):
            rows[f"G{g} {m} @3"] = books(m, 3, g)
    for g in GROUPS[1:]:
        for b in (3, 2):
            rows[f"G{g} 8-bit scales lambda-lloyd @{b}"] = books("lambda-lloyd", b, g, 8)
    results = evaluate(model, evals, rows)
    command = ("python eval/where_error.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    payload = {"command": command, "model": "smollm2-135m", "dataset": "enwiki-excerpt", "seqlen": args.seqlen,
               "calib_windows": calib.n, "eval_windows": evals.n, "dtype": "float32",
               "seconds": time.perf_counter() - t0, "rows": {k: v.to_dict() for k, v in results.items()}}
    write_text(ROOT / "out" / "where_error_smollm2.json", json.dumps(payload, indent=1))
    md = markdown(payload)
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", "where-error-smollm2", md)


def markdown(p: dict) -> str:
    rows, fp = p["rows"], p["rows"]["fp"]["ppl"]
    out = [
        f"## Where the error sits: {p['model']}, {p['dataset']}, seqlen {p['seqlen']}",
        "",
        (f"Command: `{p['command']}` — pre-RoPE channel-group codebooks, first token exact, {p['dtype']}, "
         f"{p['eval_windows']} evaluation windows (first), {p['calib_windows']} calibration windows (last). "
         f"Unquantized perplexity **{fp:.3f}**. Rows quantize only the named part (the rest exact); bits are those "
         "of the quantized entries."),
        "",
        "| row | ppl | Δ | eff. bits |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        if name != "fp":
            out.append(f"| {name} | {r['ppl']:.3f} | {r['ppl'] / fp - 1:+.2%} | {r['effective_bits']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
