"""The deployed configurations: K/V bit splits chosen on development windows, reported on
evaluation windows, beside the KIVI-style INT cache, all through the KV cache (generation mode).

For each target of K/V bits held (every byte the cache holds at the end of a window counted:
codes, group scales, value scales, positions of pre-RoPE keys, exact sinks and tokens) the
candidates ``lambda-lloyd@K/V`` — keys at K effective bits, the code budget water-filled over
the key channels only (queries exact), values V-bit INT per token — are run on the development
windows; the best one holding at most the target is reported on the evaluation windows, with:

- ``kivi@B/V``: keys min–max INT per channel over the same groups (post-RoPE, fp16 scales, no
  sink), values the same per-token INT, the same exact incomplete group;
- ``quanto@B``: transformers' ``QuantizedCache`` with optimum-quanto (K and V at B bits, its
  defaults: groups of 64 channels per token, 128 exact recent tokens) — needs the compare extra;
- the chosen rows with the queries quantized too (``+qB``: static per-channel query tables at B
  bits from the same statistics, :meth:`kvquant.codebooks.Codebooks.causal_queries`, through
  :func:`kvquant.query_quantizer` — causal, so decoding gives the codes a prefill gives);
- the chosen keys with exact values through the cache (generation) and through the simulated
  path (one forward pass, :meth:`kvquant.codebooks.SideBooks.apply`, queries and values exact),
  to show that the simulation measures what the cache runs.

Windows: the first ``--windows`` of the text are the evaluation windows, the ``--dev`` after them
the development windows; calibration (the codebook file) used the end of the text.

Usage:  python eval/deployed.py --codebooks out/default.safetensors [--windows 4] [--dev 2]
Prints a markdown table and writes out/deployed.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path

from kvquant import query_quantizer, wrapped
from kvquant.io.data import held_out_windows
from kvquant.evaluation.diagnostics import KeysOnly
from kvquant.io.fileio import write_text
from kvquant.evaluation.generation import cache_factories, evaluate_generation
from kvquant.evaluation.perplexity import evaluate, make_rows

ROOT = Path(__file__).resolve().parents[1]

#: Candidates per target T (K/V bits held): values at V bits (+ 0.25 bits of 8-bit mid/half per
#: token and head of 64) and the keys at K = 2T − V − 0.35 effective bits, which leaves about 0.02
#: bits for the exact sink's float32 values and margin on SmolLM2-135M at seqlen 2048 (checked:
#: a candidate holding more than T is not selected).
CANDIDATES = {t: [(round(2 * t - v - 0.35, 2), v) for v in (int(t), int(t) - 1)] for t in (4.0, 3.0, 2.0)}
KIVI = ["kivi@4/4", "kivi@4/3", "kivi@3/3", "kivi@3/2", "kivi@2/2"]
LIBRARY = ["quanto@4", "quanto@2"]  # transformers' QuantizedCache (the compare extra)


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--simulated-only", metavar="ROWS",
                    help="only the simulated path (one forward per window, keys only) of these rows, e.g. the ones "
                         "an earlier run chose (comma-separated); no selection, no generation mode")
    args = ap.parse_args(argv)
    books, model, tok, text = load(args)
    windows = held_out_windows(tok, text, args.seqlen, args.windows + args.dev, books.calibration)
    dev, ev = windows.ids[args.windows :], windows.ids[: args.windows]

    def caches(names: list[str]) -> dict:
        return cache_factories(model, make_rows(names, books, args.seqlen, generation=True))

    def simulated(names: list[str]) -> dict:
        rows = {f"{n} simulated": KeysOnly(make_rows([n], books, args.seqlen, generation=True)[n]) for n in names}
        return {k: r.to_dict() for k, r in evaluate(model, ev, {"fp": None, **rows}).items()}

    command = "python eval/deployed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.simulated_only:
        res = simulated([n.split("/")[0] for n in args.simulated_only.split(",")])
        lines = [f"`{command}` — {args.model}, {args.dataset}, seqlen {args.seqlen}, float32, the first {args.windows} "
                 "windows, keys quantized as the cache holds them (block-causal: a key read quantized once its group "
                 "is complete), queries and values exact", "", "| row | key effective bits | Δ vs fp |", "|---|---|---|"]
        lines += [f"| {n} | {r['effective_bits']:.3f} | {r['ppl'] / res['fp']['ppl'] - 1:+.2%} |" for n, r in res.items()]
        print("\n".join(lines))
        write_text(ROOT / "out" / "deployed_simulated.json", json.dumps({"command": command, "rows": res}, indent=1))
        return

    names = ["fp"] + [f"lambda-lloyd@{k:g}/{v}" for c in CANDIDATES.values() for k, v in c]
    dev_res = {k: r.to_dict() for k, r in evaluate_generation(model, dev, caches(names)).items()}
    chosen = {}
    for target, cands in CANDIDATES.items():
        fits = [f"lambda-lloyd@{k:g}/{v}" for k, v in cands]
        fits = [n for n in fits if dev_res[n]["effective_bits"] <= target + 1e-9]
        if fits:
            chosen[target] = min(fits, key=lambda n: dev_res[n]["ppl"])
    keys_only = {t: n.split("/")[0] for t, n in chosen.items()}  # the chosen keys, values exact
    ev_names = ["fp", *chosen.values(), *KIVI, *LIBRARY, *keys_only.values()]
    ev_res = {k: r.to_dict() for k, r in evaluate_generation(model, ev, caches(ev_names)).items()}
    for target, name in chosen.items():
        for qbits in sorted({4, int(target)}, reverse=True):
            with wrapped(model, query_quantizer(books.causal_queries(qbits), model)):
                r = evaluate_generation(model, ev, caches([name]))[name].to_dict()
            ev_names.append(f"{name} +q{qbits}")
            ev_res[ev_names[-1]] = r
    sim_res = simulated(list(keys_only.values()))

    fp_dev, fp_ev, fp_sim = dev_res["fp"]["ppl"], ev_res["fp"]["ppl"], sim_res["fp"]["ppl"]
    lines = [f"`{command}` — {args.model}, {args.dataset}, seqlen {args.seqlen}, float32, generation mode (every "
             f"token reads the cache), queries exact; evaluation = the first {args.windows} windows, development = "
             f"the next {args.dev}; fp perplexity {fp_ev:.3f} (eval), {fp_dev:.3f} (dev)", "",
             "Development (selection):", "", "| row | K/V bits held | dev Δ vs fp |", "|---|---|---|"]
    for n in names[1:]:
        lines.append(f"| {n} | {dev_res[n]['effective_bits']:.3f} | {dev_res[n]['ppl'] / fp_dev - 1:+.2%} |")
    lines += ["", "Evaluation:", "", "| row | K/V bits held | bytes/token | eval Δ vs fp |", "|---|---|---|---|"]
    for n in ev_names[1:]:
        r = ev_res[n]
        label = n + (" (values exact)" if n in keys_only.values() else "")
        lines.append(f"| {label} | {r['effective_bits']:.3f} | {r['kv_bytes_per_token']:.0f} | {r['ppl'] / fp_ev - 1:+.2%} |")
    for n, r in sim_res.items():
        if n != "fp":
            lines.append(f"| {n} (keys only, one forward) | {r['effective_bits']:.3f} (keys) | – | {r['ppl'] / fp_sim - 1:+.2%} |")
    print("\n".join(lines))
    write_text(ROOT / "out" / "deployed.json", json.dumps(
        {"command": command, "chosen": {str(t): n for t, n in chosen.items()}, "dev": dev_res, "eval": ev_res,
         "simulated": sim_res}, indent=1))


if __name__ == "__main__":
    main()
