"""Choose the default group size and scale storage on development windows (issue 5, item 6).

Candidates at the same effective bits (b + 0.256 at seqlen 2048): G 128 with fp16 (mid, half)
(the previous default) and G 64 with 8-bit (mid, half) (``scale_bits=8``), plus G 32 with 8-bit
scales (b + 0.506); codebooks lambda and lambda-lloyd; pre-RoPE, first token exact. Calibration
on the LAST ``--calib`` windows; perplexity on ``--dev`` development windows right after the
``--skip`` evaluation windows (disjoint from calibration and from the evaluation windows that
the BENCHMARKS tables report), so the choice is not made on evaluation windows.

Usage:  python eval/select_default.py [--seqlen 2048] [--calib 8] [--skip 4] [--dev 2] [--bits 4,3]
Writes out/select_default_smollm2.json and the ``select-default-smollm2`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvquant.assets import load_model
from kvquant.calibrate import capture
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.data import load_text, split_calib_eval
from kvquant.fileio import replace_section, write_text
from kvquant.fingerprint import ModelFingerprint
from kvquant.perplexity import evaluate

ROOT = Path(__file__).resolve().parents[1]
#: (group, scale_bits) candidates, first token exact.
CANDIDATES = [(128, 16), (64, 8), (32, 8)]
METHODS = ("lambda", "lambda-lloyd")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--skip", type=int, default=4, help="evaluation windows (first of the corpus) left out")
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--bits", default="4,3")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    calib, first = split_calib_eval(tok, load_text("enwiki-excerpt"), args.seqlen, args.calib, args.skip + args.dev,
                                    source="enwiki-excerpt")
    dev = first.ids[args.skip:]
    fp = ModelFingerprint.from_model(model)
    stats, hists = capture(model, calib, [(g, 1, 0.0, sb) for g, sb in CANDIDATES], rope="pre")
    rows: dict = {"fp": None}
    for b in (int(x) for x in args.bits.split(",")):
        for g, sb in CANDIDATES:
            for m in METHODS:
                config = CodebookConfig(m, b, b, "channel-group", g, 1, rope="pre", scale_bits=sb)
                rows[f"{m} G{g} {sb}-bit scales @{b}"] = Codebooks.from_stats(stats, config, fp, {},
                                                                             hists[(g, 1, 0.0, sb)])
    results = evaluate(model, dev, rows)
    command = ("python eval/select_default.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    payload = {"command": command, "model": "smollm2-135m", "dataset": "enwiki-excerpt", "seqlen": args.seqlen,
               "calib_windows": calib.n, "dev_windows": int(dev.shape[0]), "dtype": "float32",
               "seconds": time.perf_counter() - t0, "rows": {k: v.to_dict() for k, v in results.items()}}
    write_text(ROOT / "out" / "select_default_smollm2.json", json.dumps(payload, indent=1))
    fpp = payload["rows"]["fp"]["ppl"]
    lines = [
        f"## Default selection on development windows (issue 5): {payload['model']}, {payload['dataset']}, "
        f"seqlen {payload['seqlen']}",
        "",
        (f"Command: `{command}` — pre-RoPE channel-group codebooks, first token exact, {payload['dtype']}; "
         f"calibration on the last {payload['calib_windows']} windows, perplexity on {payload['dev_windows']} "
         f"development windows (after the {args.skip} evaluation windows; unquantized **{fpp:.3f}** there)."),
        "",
        "| row | ppl | Δ | eff. bits |",
        "|---|---|---|---|",
    ] + [f"| {k} | {r['ppl']:.3f} | {r['ppl'] / fpp - 1:+.2%} | {r['effective_bits']:.3f} |"
         for k, r in payload["rows"].items() if k != "fp"]
    md = "\n".join(lines)
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", "select-default-smollm2", md)


if __name__ == "__main__":
    sys.exit(main())
