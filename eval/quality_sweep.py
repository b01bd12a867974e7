"""Where should scale, offset and outliers come from so that the density shape wins? (issue 5)

Grid on one model: normalisation {static per head (the seed paper), dynamic min–max per
channel over G tokens} × sink tokens kept exact {0, 1} × codebook {uniform, lloydmax, lambda,
lambda-lloyd} × bits, plus the per-token INT/FP baselines. Calibration on the LAST windows of
the corpus, evaluation on the FIRST windows; every row in one process on the same windows.
Effective bits count every scale, zero point and exact sink entry.

Usage:  python eval/quality_sweep.py [--model smollm2-135m] [--seqlen 2048] [--calib 8]
                                     [--windows 8] [--bits 4,3,2] [--name smollm2]
Writes out/sweep_<name>.json, docs/sweep_<name>.png and the ``sweep-<name>`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvquant.assets import load_model
from kvquant.baselines import Baseline
from kvquant.calibrate import capture
from kvquant.codebook import METHODS
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.data import load_text, split_calib_eval
from kvquant.fileio import atomic_path, replace_section, write_text
from kvquant.fingerprint import ModelFingerprint
from kvquant.perplexity import evaluate

ROOT = Path(__file__).resolve().parents[1]
#: (label, norm, sink) of the normalisations studied; group 128 for the dynamic one.
NORMS = [("head", "head", 0), ("chgroup", "channel-group", 0), ("chgroup+sink", "channel-group", 1)]
GROUP = 128


def build_rows(model, calib, bits_list: list[int], progress: bool = True) -> dict:
    rows: dict = {"fp": None}
    for b in bits_list:
        rows[f"int{b}/token"] = Baseline(f"int{b}")
        rows[f"int{b}/channel"] = Baseline(f"int{b}-channel")
        if b in (4, 8):
            rows[f"fp{b}/token"] = Baseline(f"fp{b}")
    group_sinks = sorted({(GROUP, sink) for _, norm, sink in NORMS if norm == "channel-group"})
    stats, hists = capture(model, calib, group_sinks, progress=progress)  # one pass for every setting
    fp = ModelFingerprint.from_model(model)
    for label, norm, sink in NORMS:
        for b in bits_list:
            for m in METHODS:
                if norm != "channel-group" and m == "uniform":
                    continue  # a static σ-clipped uniform grid; the channel-group uniform is INT per channel
                config = CodebookConfig(m, b, b, norm, GROUP, sink)
                rows[f"{m}@{b}/{label}"] = Codebooks.from_stats(stats, config, fp, {}, hists.get((GROUP, sink)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-only", action="store_true", help="redo the table and plot from out/sweep_<name>.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--dataset", default="enwiki-excerpt")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--bits", default="4,3,2")
    args = ap.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    png = ROOT / "docs" / f"sweep_{args.name}.png"
    if args.report_only:
        report(json.loads((ROOT / "out" / f"sweep_{args.name}.json").read_text()), bits_list, png, args.name)
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    calib, evals = split_calib_eval(tok, load_text(args.dataset), args.seqlen, args.calib, args.windows, source=args.dataset)
    results = evaluate(model, evals, build_rows(model, calib, bits_list))
    command = ("python eval/quality_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    payload = {
        "command": command, "model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
        "calib_windows": calib.n, "eval_windows": evals.n, "bos_prepended": evals.bos_prepended,
        "dtype": "float32", "group": GROUP, "seconds": time.perf_counter() - t0,
        "rows": {k: v.to_dict() for k, v in results.items()},
    }
    write_text(ROOT / "out" / f"sweep_{args.name}.json", json.dumps(payload, indent=1))
    report(payload, bits_list, png, args.name)


def report(payload: dict, bits_list: list[int], png: Path, name: str) -> None:
    plot(payload, png)
    md = markdown(payload, bits_list, png.relative_to(ROOT))
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", f"sweep-{name}", md)


def family(name: str) -> str:
    """Plot series of a row: the quantizer family with its normalisation."""
    if "@" in name:
        method, rest = name.split("@")
        return f"{method} / {rest.split('/')[1]}"
    return name.split("/")[1].join(["INT per ", ""]) if name.startswith("int") else "FP per token"


def plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = p["rows"]["fp"]["ppl"]
    series: dict[str, list[tuple[float, float]]] = {}
    for name, r in p["rows"].items():
        if name != "fp":
            series.setdefault(family(name), []).append((r["effective_bits"], r["ppl"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=label, color=plt.cm.tab20(i % 20), linestyle="--" if ("INT" in label or "FP" in label) else "-")
    ax.axhline(fp, color="k", linewidth=0.8, label=f"unquantized {fp:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per q/k entry (scales, zero points, sinks counted)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{p['model']} · {p['dataset']} · seqlen {p['seqlen']} · {p['eval_windows']} windows · Q and K quantized")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def markdown(p: dict, bits_list: list[int], png: Path) -> str:
    rows, fp = p["rows"], p["rows"]["fp"]["ppl"]
    cell = lambda r: "–" if r is None else f"{r['ppl']:.3f} ({r['ppl'] / fp - 1:+.1%}) [{r['effective_bits']:.3f}b]"  # noqa: E731
    out = [
        f"## Quality sweep (issue 5): {p['model']}, {p['dataset']}, seqlen {p['seqlen']}",
        "",
        f"Command: `{p['command']}` — {p['eval_windows']} evaluation windows (first of the corpus), "
        f"{p['calib_windows']} calibration windows (last), {p['dtype']}, Q and K both quantized post-RoPE. "
        f"Unquantized perplexity **{fp:.3f}**. Cells: ppl (Δ) [effective bits]. Normalisations: `head` = "
        f"static μ, σ per head from calibration (the seed paper); `chgroup` = dynamic min–max per channel over {p['group']} tokens "
        f"(+32/{p['group']} bits), codebook on [−1, 1] from the calibration histogram of x̃; `+sink` = first token "
        "exact (16 bits). `uniform / chgroup` is exactly INT per channel. Plot: "
        f"[{png}]({png}).",
        "",
    ]
    for b in bits_list:
        out += [f"### {b} bits", "", "| normalisation | " + " | ".join(METHODS) + " |", "|" + "---|" * (len(METHODS) + 1)]
        for label, _, _ in NORMS:
            out.append(f"| {label} | " + " | ".join(cell(rows.get(f"{m}@{b}/{label}")) for m in METHODS) + " |")
        base = [f"int{b}/token", f"int{b}/channel"] + ([f"fp{b}/token"] if f"fp{b}/token" in rows else [])
        out.append("| baselines | " + " · ".join(f"{n}: {cell(rows[n])}" for n in base) + " | | | |")
        out.append("")
    out += ["### What each ingredient buys (Δ perplexity vs unquantized)", "",
            "| step | " + " | ".join(f"{b} bits" for b in bits_list) + " |", "|" + "---|" * (len(bits_list) + 1)]
    steps = [
        ("λ* codebook, static σ per head (seed paper)", "lambda@{b}/head"),
        ("→ dynamic min–max per channel, uniform (= INT per channel)", "uniform@{b}/chgroup"),
        ("→ + first token exact", "uniform@{b}/chgroup+sink"),
        ("→ + empirical density (f·w)^{1/3} (lambda)", "lambda@{b}/chgroup+sink"),
        ("→ + Lloyd on the pair-weighted histogram (lambda-lloyd)", "lambda-lloyd@{b}/chgroup+sink"),
    ]
    for label, key in steps:
        vals = [rows.get(key.format(b=b)) for b in bits_list]
        out.append(f"| {label} | " + " | ".join("–" if r is None else f"{r['ppl'] / fp - 1:+.1%}" for r in vals) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
