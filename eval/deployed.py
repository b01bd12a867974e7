"""The deployed configurations at 4, 3 and 2 K/V bits held **on average over a window's
positions**: K/V bit splits fitted to each target, chosen on development windows, reported on
evaluation windows beside the KIVI-style INT cache and transformers' quanto cache, all through
the KV cache (generation mode), in the model's dtype (``--dtype``).

Bits held are counted as :func:`kvquant.evaluation.generation.held_bits` counts them: every byte
a cache holds per K/V entry (codes, group scales, value scales, exact sink, the newest incomplete
group as INT8) after each token of the window, averaged over its positions — a user decoding
through the window holds that on average; the end of a 2048-token window (all groups complete)
is the best case, about 0.5 bits below the mean.

For each target T and value bits V ∈ {T, T − 1} the keys get the largest K (0.05 steps) whose
cache ``lambda-lloyd@K/V`` — keys at K effective bits water-filled over the key channels (queries
exact), values V-bit INT per token — holds at most T on average (:func:`fit_key_bits`, by the
shape-only replay, before any text is read). Of the fitted candidates, the one with the lowest KL
divergence from the unquantized model on the development windows is reported on the evaluation
windows (the rule fixed before the run), with:

- ``kivi@B/V``: keys min–max INT per channel over the same groups (post-RoPE, fp16 scales, no
  sink), values the same per-token INT, the newest group exact as KIVI holds it;
- ``quanto@B``: transformers' ``QuantizedCache`` with optimum-quanto (K and V at B bits, its
  defaults: groups of 64 channels per token, 128 exact recent tokens) — needs the compare extra.

The queries quantized beside these caches are ``eval/causal_queries.py``'s job.

Windows: the first ``--windows`` of the text are the evaluation windows, the ``--dev`` after them
the development windows; calibration (the codebook file) used the end of the text.

Usage:  python eval/deployed.py --codebooks out/default.safetensors [--windows 4] [--dev 2] [--dtype auto]
            [--baselines kivi@4/4,...] [--json out/deployed.json]
Prints markdown tables and writes ``--json``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path

from kvquant.io.data import held_out_windows
from kvquant.evaluation.diagnostics import KeysOnly
from kvquant.io.fileio import write_text
from kvquant.evaluation.generation import cache_factories, evaluate_generation, held_bits
from kvquant.evaluation.perplexity import evaluate, format_table, make_rows

ROOT = Path(__file__).resolve().parents[1]

TARGETS = (4.0, 3.0, 2.0)  # K/V bits held, mean over a window's positions
KIVI = ["kivi@4/4", "kivi@4/3", "kivi@3/3", "kivi@3/2", "kivi@2/2"]
LIBRARY = ["quanto@4", "quanto@2"]  # transformers' QuantizedCache (the compare extra)
STEP = 0.05  # resolution of the fitted key bits


def fit_key_bits(mean_bits, target: float, v: int, start: float) -> tuple[float | None, float | None]:
    """``(K, mean)``: the largest K on a grid of :data:`STEP` whose ``mean_bits(K, v)`` (mean K/V
    bits held, increasing in K) is at most ``target``, and that mean; ``(None, None)`` where even
    the fewest key bits the codebooks allow hold more (``mean_bits`` raises ``ValueError`` below them).

    A secant step from ``start`` and ``start − 0.5`` (the mean is nearly linear in K), then single
    steps down until the target holds and up while the next step still holds it."""
    @functools.cache
    def mean(k: float) -> float | None:
        try:
            return mean_bits(k, v)
        except ValueError:  # below the fewest code bits per entry
            return None

    k0, k1 = round(start, 2), round(start - 0.5, 2)
    m0, m1 = mean(k0), mean(k1)
    k = k0 if m0 is None or m1 is None or m0 == m1 else k0 - (m0 - target) * (k0 - k1) / (m0 - m1)
    k = round(STEP * int(k / STEP + 1e-9), 2)
    m = mean(k)
    while m is None and k < k0:  # the secant went below the fewest key bits: step back up
        k = round(k + STEP, 2)
        m = mean(k)
    while m is not None and m > target:
        k = round(k - STEP, 2)
        m = mean(k)
    if m is None:
        return None, None
    while (up := mean(round(k + STEP, 2))) is not None and up <= target:
        k, m = round(k + STEP, 2), up
    return k, m


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="the model's dtype (default auto: the dtype it ships in where the "
                    "CPU computes it natively, else float32)")
    ap.add_argument("--baselines", default=",".join(KIVI + LIBRARY),
                    help="rows reported beside the chosen ones (default: the KIVI and quanto rows; transformers' "
                         "quanto cache refuses models with sliding-window layers, e.g. Gemma3: leave quanto@B out)")
    ap.add_argument("--json", default="out/deployed.json", help="where the results go (default out/deployed.json)")
    ap.add_argument("--simulated-only", metavar="ROWS",
                    help="only the simulated path (one forward per window, keys only) of these rows, e.g. the ones "
                         "an earlier run chose (comma-separated); no selection, no generation mode")
    args = ap.parse_args(argv)
    books, model, tok, text = load(args, dtype=args.dtype)
    dtype = str(model.dtype).removeprefix("torch.")
    windows = held_out_windows(tok, text, args.seqlen, args.windows + args.dev, books.calibration)
    dev, ev = windows.ids[args.windows :], windows.ids[: args.windows]
    command = "python eval/deployed.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def caches(names: list[str]) -> dict:
        return cache_factories(model, make_rows(names, books, args.seqlen, generation=True))

    if args.simulated_only:
        names = [n.split("/")[0] for n in args.simulated_only.split(",")]
        rows = {f"{n} simulated": KeysOnly(make_rows([n], books, args.seqlen, generation=True)[n]) for n in names}
        res = {k: r.to_dict() for k, r in evaluate(model, ev, {"fp": None, **rows}).items()}
        lines = [f"`{command}` — {args.model}, {args.dataset}, seqlen {args.seqlen}, {dtype}, the first {args.windows} "
                 "windows, keys quantized as the cache holds them (block-causal: a key read quantized once its group "
                 "is complete), queries and values exact", "", "| row | key effective bits | Δ vs fp |", "|---|---|---|"]
        lines += [f"| {n} | {r['effective_bits']:.3f} | {r['ppl'] / res['fp']['ppl'] - 1:+.2%} |" for n, r in res.items()]
        print("\n".join(lines))
        write_text(ROOT / "out" / "deployed_simulated.json", json.dumps({"command": command, "rows": res}, indent=1))
        return

    def mean_bits(k: float, v: int) -> float:
        name = f"lambda-lloyd@{k:g}/{v}"
        return held_bits(caches([name])[name], model, args.seqlen).mean

    fitted: dict[float, list[str]] = {}
    for target in TARGETS:
        for v in (int(target), int(target) - 1):
            k, m = fit_key_bits(mean_bits, target, v, start=2 * target - v - 0.35)
            print(f"target {target:g} bits held, values {v} bits: " + (
                f"keys {k:g} effective bits hold {m:.3f}" if k is not None else "no key bits fit"), flush=True)
            if k is not None:
                fitted.setdefault(target, []).append(f"lambda-lloyd@{k:g}/{v}")
    names = ["fp"] + [n for c in fitted.values() for n in c]
    dev_rows = evaluate_generation(model, dev, caches(names))
    chosen = {t: min(c, key=lambda n: dev_rows[n].kld) for t, c in fitted.items()}
    baselines = [n for n in args.baselines.split(",") if n]
    ev_rows = evaluate_generation(model, ev, caches(["fp", *dict.fromkeys(chosen.values()), *baselines]))

    head = (f"{args.model}, {args.dataset}, seqlen {args.seqlen}, {dtype}, generation mode (every token reads the "
            "cache), queries exact; K/V bits held: mean over the window's positions / at its end / largest")
    text_out = "\n".join([
        f"`{command}`", "", head, "",
        f"Development windows {args.windows + 1}–{args.windows + args.dev} (selection: the lowest KLD of the candidates "
        "fitted to each target):", "", format_table(dev_rows), "",
        "Chosen: " + ", ".join(f"{n} for ≤ {t:g} bits held" for t, n in chosen.items()), "",
        f"Evaluation windows 1–{args.windows}:", "", format_table(ev_rows)])
    print(text_out)
    write_text(ROOT / args.json, json.dumps(
        {"command": command, "title": head, "chosen": {str(t): n for t, n in chosen.items()},
         "dev": {k: r.to_dict() for k, r in dev_rows.items()}, "eval": {k: r.to_dict() for k, r in ev_rows.items()}},
        indent=1))


if __name__ == "__main__":
    main()
