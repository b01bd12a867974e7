"""The token group of the deployed cache's keys, chosen on development windows by the mean bits
held and the quality at that mean.

Keys are quantized once their group of G tokens is complete; until then the newest incomplete
group (up to G − 1 tokens of keys and values) stays exact, which is what makes the bits held over
a window (:func:`kvquant.evaluation.generation.held_bits`) exceed the bits at its end. A smaller G shrinks
that exact tail; its per-channel (mid, half) scales cost 16/G bits per key entry more, paid from
the same effective-bits target. For each G, codebooks are calibrated as ``configs/default.yaml``
with ``--group G`` (``out/group_G.safetensors``, made once by ``kvquant calibrate``), then fp and
each file's own row run through the cache on the development windows — the ``--dev`` windows
after the first ``--windows``, which the main job reports on and which stay unseen here — in the
model's own dtype (bfloat16 for SmolLM2).

Usage:  python eval/group_size.py [--groups 32,64,128] [--windows 4] [--dev 2]
Prints a markdown table and writes out/group_size.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows (first of the text; not used here)")
    ap.add_argument("--dev", type=int, default=2, help="development windows, after the evaluation windows")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]

    from kvquant.io.assets import load_model
    from kvquant.codebooks import Codebooks
    from kvquant.io.data import held_out_windows, load_text
    from kvquant.io.fileio import write_text
    from kvquant.evaluation.generation import cache_factories, evaluate_generation
    from kvquant.evaluation.perplexity import format_table

    files = {}
    for g in groups:
        path = ROOT / "out" / f"group_{g}.safetensors"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "kvquant", "calibrate", "--config", str(ROOT / "configs/default.yaml"),
                            "--group", str(g), "--out", str(path)], check=True, cwd=ROOT)
        files[g] = Codebooks.load(path)
    model, tok = load_model("smollm2-135m")
    first = files[groups[0]]
    windows = held_out_windows(tok, load_text("enwiki-excerpt", split="test"), first.calibration["seqlen"],
                               args.windows + args.dev, first.calibration, source="enwiki-excerpt")
    dev = windows.ids[args.windows:]
    rows = {"fp": None, **{f"G={g}": books for g, books in files.items()}}
    results = evaluate_generation(model, dev, cache_factories(model, rows))
    title = (f"smollm2-135m · enwiki-excerpt · development windows {args.windows + 1}–{args.windows + args.dev} × "
             f"{dev.shape[1]} tokens · {str(model.dtype).removeprefix('torch.')} · generation mode · keys as "
             "configs/default.yaml with --group G (K 3.65 effective bits at 2048 tokens, V 4)")
    print(title)
    print(format_table(results))
    write_text(ROOT / "out" / "group_size.json", json.dumps(
        {"title": title, "groups": groups, "rows": {k: v.to_dict() for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
