"""KL divergence from the unquantized model and top-token agreement of the deployed caches.

Every row runs on the same held-out windows (the first of the text, disjoint from the codebook
file's calibration windows) in one process, windows outer: the unquantized row (``fp``,
transformers' ``DynamicCache``) first, then each row's next-token distributions are compared
with it position by position (:mod:`kvquant.evaluation.divergence`: mean KL(p_fp ‖ p_row) in nats, its 99th
percentile, the share of positions whose top token agrees — llama.cpp's ``--kl-divergence``
statistics).

- Generation mode (the deployed path, ``--rows``): every token reads the keys and values the
  cache holds, queries exact — kvquant's cache at K effective bits per key entry and V-bit values
  (``lambda-lloyd@K/V``), the KIVI-style INT cache (``kivi@B/V``), transformers' quanto cache
  (``quanto@B``; the compare extra).
- Simulated Q·Kᵀ (``--simulated``, optional): queries and keys quantized inside one forward pass
  (``lambda-lloyd@B`` at exactly B effective bits per q/k entry, INT baselines post-RoPE).

Usage:  python eval/divergence.py --codebooks out/default.safetensors [--model smollm2-135m]
                                  [--windows 4] [--seqlen 2048] [--rows ...] [--simulated ...] [--name smollm2]
Writes out/divergence_<name>.json, docs/kld_<name>.png and the BENCHMARKS.md section ``divergence-<name>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path

from kvquant.io.data import held_out_windows
from kvquant.io.fileio import atomic_path, replace_section, write_text
from kvquant.evaluation.generation import cache_factories, evaluate_generation
from kvquant.evaluation.perplexity import evaluate, format_table, make_rows

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("fp,lambda-lloyd@3.65/4,lambda-lloyd@2.65/3,lambda-lloyd@1.65/2,kivi@4/4,kivi@3/3,kivi@2/2,"
        "quanto@4,quanto@2")
#: plot label of each row family (the part of a row name before ``@``)
FAMILIES = {"lambda-lloyd": "kvquant (density codebook keys, INT values)", "kivi": "KIVI-style INT cache",
            "quanto": "transformers' quanto cache"}


def plot(rows: dict, path: Path, title: str) -> None:
    """KLD (log scale) against K/V bits held, one line per row family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for family, label in FAMILIES.items():
            pts = sorted((r["effective_bits"], r["kld"]) for n, r in rows.items() if n.split("@")[0] == family)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("K/V bits held per entry (everything the cache holds counted)")
        ax.set_ylabel("mean KL(p_fp ‖ p_row) per token, nats (log)")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rows", default=ROWS, help=f"generation-mode rows (default {ROWS})")
    ap.add_argument("--simulated", default="", help="simulated-path rows too, e.g. fp,int4-channel,lambda-lloyd@4")
    ap.add_argument("--name", default="smollm2")
    args = ap.parse_args(argv)
    command = "python eval/divergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    books, model, tok, text = load(args)
    ev = held_out_windows(tok, text, args.seqlen, args.windows, books.calibration)
    names = args.rows.split(",")
    gen = evaluate_generation(model, ev, cache_factories(model, make_rows(names, books, args.seqlen, generation=True)))
    protocol = (f"{args.model}, {args.dataset}, seqlen {args.seqlen}, the first {args.windows} windows "
                f"({ev.n * (args.seqlen - 1)} predicted tokens, held out from the codebooks' calibration), float32")
    body = [f"`{command}` — {protocol}; codebooks {args.codebooks}", "",
            "Generation mode (every token reads the KV cache; queries exact), KLD against fp through `DynamicCache`:",
            "", format_table(gen)]
    payload = {"command": command, "model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
               "windows": ev.n, "generation": {k: r.to_dict() for k, r in gen.items()}}
    if args.simulated:
        sim = evaluate(model, ev, make_rows(args.simulated.split(","), books, args.seqlen))
        body += ["", "Simulated Q·Kᵀ (queries and keys quantized in one forward pass; INT baselines post-RoPE):", "",
                 format_table(sim)]
        payload["simulated"] = {k: r.to_dict() for k, r in sim.items()}
    png = ROOT / "docs" / f"kld_{args.name}.png"
    plot(payload["generation"], png, f"{protocol}; generation mode")
    body += ["", f"![KLD vs K/V bits]({png.relative_to(ROOT)})"]
    print("\n".join(body))
    write_text(ROOT / "out" / f"divergence_{args.name}.json", json.dumps(payload, indent=1))
    replace_section(ROOT / "BENCHMARKS.md", f"divergence-{args.name}",
                    f"## KL divergence and top-token agreement: {args.model}\n\n" + "\n".join(body))


if __name__ == "__main__":
    main()
