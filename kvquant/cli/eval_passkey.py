"""``kvquant eval-passkey``: long-context retrieval through each row's KV cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvquant.cli.eval_ppl import baseline_rows
from kvquant.cli.options import (
    check_context,
    load_model_of,
    comma_numbers,
    resolve_options,
    trained_context,
)


def cmd_eval_passkey(args) -> None:
    from kvquant.codebooks import Codebooks
    from kvquant.evaluation.generation import cache_factories
    from kvquant.evaluation.passkey import ANSWER_TOKENS, format_passkey, passkey_prompt, plot_heatmap, run_passkey
    from kvquant.io.data import needs_bos
    from kvquant.io.fileio import atomic_paths

    resolve_options(args, ["model", "dtype", "device"])
    lengths = comma_numbers("--lengths", args.lengths, int) if args.lengths is not None else None
    if lengths and min(lengths) < 1:
        raise ValueError(f"--lengths are token counts >= 1, got {args.lengths}")
    depths = comma_numbers("--depths", args.depths)
    if any(not 0 <= d <= 100 for d in depths):
        raise ValueError(f"--depths are percentages in 0..100, got {args.depths}")
    if args.plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plots needs matplotlib: pip install 'kvquant-density[plot]'")
    books = Codebooks.load(args.codebooks) if args.codebooks else None
    seqlen = int(books.calibration["seqlen"]) if books is not None else None
    rows = baseline_rows(args.baselines or "fp", books, own=books is not None, seqlen=seqlen, generation=True)
    model, tok = load_model_of(args)
    if books is not None:
        books.check_fits(model)
    trained = trained_context(model)
    lengths = lengths or [n for n in (1024, 2048, 4096, 8192, 16384, 32768)
                          if trained is None or n + ANSWER_TOKENS <= trained]
    if not lengths:
        raise ValueError(f"the model's trained context ({trained} tokens) is below the default lengths "
                         f"(1024 + {ANSWER_TOKENS} answer tokens and up): give --lengths")
    check_context(model, max(lengths), "--lengths", extra=ANSWER_TOKENS)
    for n in lengths:  # too short for the prompt's fixed parts: an error before the first answer
        try:
            passkey_prompt(tok, n, 0.5, 0, bos=needs_bos(tok))
        except ValueError as e:
            raise ValueError(f"--lengths: {e}") from None
    fractions = [d / 100 for d in depths]
    results = run_passkey(model, tok, cache_factories(model, rows, args.bits_v or 0, args.values),
                          lengths, fractions, args.seeds, bos=needs_bos(tok))
    title = f"{args.model} · passkey · {args.seeds} seed(s) per cell · greedy through each row's cache · {args.dtype}"
    print(title)
    print(format_passkey(results, lengths))
    print("(* : fp retrieves < 90% at that length — not judged there)")
    plots = {}
    if args.plots:
        for name in results:
            safe = re.sub(r"[^A-Za-z0-9.-]+", "_", name)
            plots[name] = Path(args.plots) / f"passkey_{Path(args.model).name}_{safe}.png"
    outputs = list(plots.values()) + ([Path(args.json)] if args.json else [])
    with atomic_paths(outputs) as temps:  # the heatmaps and the JSON appear together or not at all
        for (name, r), tmp in zip(((n, results[n]) for n in plots), temps):
            plot_heatmap(r, lengths, fractions, tmp, f"{name}\n{title}")
        if args.json:
            payload = {"model": args.model, "lengths": lengths, "depths": fractions, "seeds": args.seeds,
                       "dtype": args.dtype, "codebooks": str(args.codebooks) if args.codebooks else None,
                       "rows": {k: v.to_dict() for k, v in results.items()}}
            temps[-1].write_text(json.dumps(payload, indent=1), encoding="utf-8")
    if plots:
        print(f"heatmaps: {args.plots}/passkey_{Path(args.model).name}_<row>.png")
