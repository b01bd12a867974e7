"""BENCHMARKS.md section of a ``kvquant eval-passkey --json`` run: accuracy per row and length, and
the cell-by-cell check — wherever fp retrieves ≥ 90% (a length × depth cell,
over its seeds), a row retrieves within 5 points of fp.

Usage:  python eval/passkey_table.py out/passkey_smollm2.json --name smollm2 --command "kvquant eval-passkey …"
Writes the BENCHMARKS.md section ``passkey-<name>`` (the table points at docs/passkey_<model>_<row>.png).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kvquant.io.fileio import replace_section

ROOT = Path(__file__).resolve().parents[1]


def cells(row: dict) -> dict[tuple[int, str], float]:
    """(length, depth) → share answered right, from a row's JSON ``correct``/``trials``."""
    out = {}
    for key, n in row["trials"].items():
        length, depth = key.split("@")
        out[(int(length), depth)] = row["correct"][key] / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--name", required=True)
    ap.add_argument("--command", required=True, help="the eval-passkey command that wrote the JSON")
    args = ap.parse_args()
    p = json.loads(Path(args.json).read_text())
    rows = {name: cells(r) for name, r in p["rows"].items()}
    fp = rows["fp"]
    lengths = p["lengths"]
    lines = [f"`{args.command}` — {p['model']}, {p['seeds']} seed(s) per (length, depth) cell, depths "
             f"{', '.join(f'{d:.0%}' for d in p['depths'])}, greedy answer through each row's cache, {p['dtype']}; "
             f"{args.json}", "",
             "| row | " + " | ".join(f"{n} tokens" for n in lengths) + " | cells judged (fp ≥ 90%) | within 5 points of fp |",
             "|---|" + "---|" * len(lengths) + "---|---|"]
    judged = [c for c, a in fp.items() if a >= 0.9]
    for name, acc in rows.items():
        per_length = []
        for n in lengths:
            got = [a for (length, _), a in acc.items() if length == n]
            mark = "" if sum(fp[c] for c in fp if c[0] == n) / max(1, sum(1 for c in fp if c[0] == n)) >= 0.9 else "*"
            per_length.append(f"{sum(got) / len(got):.0%}{mark}")
        ok = sum(1 for c in judged if acc[c] >= fp[c] - 0.05)
        lines.append(f"| {name} | " + " | ".join(per_length) + f" | {len(judged)} | {ok}/{len(judged)} |")
    model = Path(p["model"]).name
    lines += ["", "`*`: fp itself retrieves < 90% at that length (over its depths). Heatmaps: "
              + ", ".join(f"[{n}](docs/passkey_{model}_{re.sub(r'[^A-Za-z0-9.-]+', '_', n)}.png)" for n in rows) + "."]
    replace_section(ROOT / "BENCHMARKS.md", f"passkey-{args.name}",
                    f"## Passkey retrieval through the caches: {p['model']}\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
