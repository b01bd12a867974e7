"""``kvquant eval-ppl``: perplexity, KL divergence and top-1 agreement of every row in one run."""

from __future__ import annotations

import json
import sys

from kvquant.cli.options import (
    check_context,
    load_model_of,
    resolve_options,
)


def baseline_rows(baselines: str, books, own: bool, seqlen: int | None, generation: bool) -> dict:
    """The rows of ``--baselines`` (:func:`kvquant.evaluation.perplexity.make_rows`): fp first if not given (the
    reference of Δ, KL divergence, top-1 and passkey judgement), the codebook file's own method
    appended when ``own``, codebook rows dropped when there is no file — each such change printed
    as a note once every row is known to be valid."""
    from kvquant.evaluation.perplexity import CodebooksRequired, make_rows

    names = [n.strip() for n in baselines.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--baselines {baselines!r} names no row: give e.g. fp,int8,lambda-lloyd")
    notes = []
    if "fp" not in names:
        notes.append("adding row fp: the unquantized reference")
        names.insert(0, "fp")
    if own and books.config.method not in names:
        names.append(books.config.method)
    try:
        if books is None:  # rows that need a codebook file are dropped (noted); unknown ones are errors
            dropped = []
            for n in names:
                try:
                    make_rows([n], None, seqlen, generation=generation)
                except CodebooksRequired:
                    dropped.append(n)
            if dropped:
                notes.append(f"no --codebooks given: skipping rows {', '.join(dropped)}")
                names = [n for n in names if n not in dropped]
        rows = make_rows(names, books, seqlen, generation=generation)
    except ValueError as e:
        raise ValueError(f"--baselines: {e}") from None
    for note in notes:
        print(note, file=sys.stderr)
    return rows


def _check_rows_quantize(rows: dict, seqlen: int) -> None:
    """Generation mode: refuse rows whose cache would hold every token of a ``seqlen`` window exact
    (a key group, or transformers' 128 exact recent tokens, not smaller than the window) — they
    would equal fp and say nothing."""
    from kvquant.codebooks import Codebooks
    from kvquant.evaluation.library_cache import LIBRARY_RESIDUAL, LibraryCache

    exact = {name: row.k.group if isinstance(row, Codebooks) else LIBRARY_RESIDUAL
             for name, row in rows.items() if isinstance(row, (Codebooks, LibraryCache))}
    short = {name: n for name, n in exact.items() if n and seqlen <= n}
    if short:
        raise ValueError(
            f"--seqlen {seqlen}: rows {', '.join(short)} hold the first {max(short.values())} tokens of a window exact "
            f"(a key group completes only then), so they would equal fp; use --seqlen > {max(short.values())}")


def _keys_only_own_row(rows: dict, books) -> dict:
    """Simulated mode, a keys-only file (``budget_sides`` k: its bits were allocated over the keys of
    a KV cache, its queries left unallocated): the file's own row quantizes the keys only, queries
    exact, and says so in its name."""
    from kvquant.evaluation.diagnostics import KeysOnly

    return {(f"{n} (keys only, exact queries)" if r is books else n): (KeysOnly(books) if r is books else r)
            for n, r in rows.items()}


def with_queries(factories: dict, rows: dict, books, model, bits: int | None) -> tuple[dict, dict]:
    """Generation mode with ``--queries B``: after each codebook row (a kvquant cache) a row
    ``"ROW +qB"`` with the same cache and the queries quantized causally beside it
    (:func:`kvquant.query_quantizer` of ``books.causal_queries(B)``); ``(factories, queries)`` for
    :func:`kvquant.evaluation.generation.evaluate_generation`."""
    from kvquant import query_quantizer
    from kvquant.codebooks import Codebooks

    if bits is None:
        return factories, {}
    quantizer = query_quantizer(books.causal_queries(bits), model)
    out, queries = {}, {}
    for name, factory in factories.items():
        out[name] = factory
        if isinstance(rows[name], Codebooks):
            out[f"{name} +q{bits}"], queries[f"{name} +q{bits}"] = factory, quantizer
    return out, queries


def cmd_eval_ppl(args) -> None:
    from kvquant.codebooks import Codebooks
    from kvquant.cache import default_values
    from kvquant.evaluation.generation import cache_factories, evaluate_generation
    from kvquant.evaluation.perplexity import evaluate, format_table
    from kvquant.io.data import calibration_overlap, load_text, make_windows
    from kvquant.io.fileio import write_text

    resolve_options(args, ["model", "dataset", "seqlen", "windows", "baselines", "dtype", "device"])
    books = Codebooks.load(args.codebooks) if args.codebooks else None
    rows = baseline_rows(args.baselines, books, own=books is not None, seqlen=args.seqlen, generation=args.mode == "generation")
    if args.mode != "generation" and books is not None and books.config.budget_sides == "k":
        rows = _keys_only_own_row(rows, books)
    if args.mode == "generation":
        _check_rows_quantize(rows, args.seqlen)
    if args.bits_v is not None and args.mode != "generation":
        raise ValueError("--bits-v quantizes the values a KV cache holds: give it with --mode generation")
    if args.queries is not None and args.mode != "generation":
        raise ValueError("--queries quantizes the queries beside a KV cache: give it with --mode generation (the "
                         "simulated path quantizes queries and keys with the codebook rows themselves)")
    if args.queries is not None and books is None:
        raise ValueError("--queries builds its causal query tables from a codebook file's statistics: give --codebooks")
    if args.values is not None and not args.bits_v:
        raise ValueError("--values normalises quantized values: give it with --mode generation --bits-v B")
    if args.allow_overlap and books is None:
        raise ValueError("--allow-overlap would be ignored: it allows evaluation windows that overlap a codebook "
                         "file's calibration; give --codebooks or drop it")
    source = args.text_file or args.dataset
    text = load_text(args.text_file) if args.text_file else load_text(args.dataset, split="test")
    model, tok = load_model_of(args)
    if books is not None:
        books.check_fits(model)
    check_context(model, args.seqlen, "--seqlen")
    windows = make_windows(tok, text, args.seqlen, args.windows, from_end=False, source=source)
    overlap = calibration_overlap(books.calibration, windows) if books is not None else None
    if overlap and not args.allow_overlap:
        raise ValueError(f"{overlap}: the table would not be held out. Use fewer --windows or --seqlen, calibrate on "
                         f"other text, or give --allow-overlap to report it labelled NOT HELD OUT")
    if args.mode == "generation":
        factories = cache_factories(model, rows, args.bits_v or 0, args.values)
        factories, queries = with_queries(factories, rows, books, model, args.queries)
        results = evaluate_generation(model, windows, factories, queries=queries)
    else:
        results = evaluate(model, windows, rows)
    norm = args.values or (default_values(books.k.centers.shape[2]) if books is not None else "minmax")
    values = (f"{args.bits_v}-bit values ({norm} per token" + (", KIVI rows minmax" if norm != "minmax" else "") + ")"
              if args.bits_v else "values as each row's cache holds them (a row's /V, else the codebooks' bits_v, "
              f"else exact; {norm} per token, KIVI rows minmax)")
    queried = (f"queries exact, rows '+q{args.queries}' queries quantized causally at {args.queries} bits"
               if args.queries is not None else "queries exact")
    mode = (f" · generation mode (every token reads the KV cache; {queried}; {values})"
            if args.mode == "generation" else " · simulated (one forward pass per window)")
    header = (f"model {args.model} · text {source} · {windows.n} windows × {args.seqlen} tokens "
              f"(first windows; BOS prepended: {windows.bos_prepended}) · dtype {args.dtype}{mode}"
              + (f" · codebooks {args.codebooks} (q {books.q.mean_bits:.4g}, k {books.k.mean_bits:.4g} code bits"
                 + (" on average, allocated per channel" if books.config.budget else "")
                 + f", norm {books.config.norm}, {books.config.rope}-RoPE; baselines post-RoPE)" if books else ""))
    if overlap:
        header += f" · NOT HELD OUT: {overlap}"
    print(header)
    print(format_table(results))
    if args.json:
        payload = {
            "model": args.model, "text": source, "seqlen": args.seqlen, "windows": windows.n, "mode": args.mode,
            "bits_v": args.bits_v or 0 if args.mode == "generation" else None,
            "queries": args.queries,
            "values": norm,  # make_cache's default where not given (kvquant.cache.default_values)
            "bos_prepended": windows.bos_prepended, "dtype": args.dtype,
            "codebooks": str(args.codebooks) if args.codebooks else None,
            "held_out": overlap is None, "overlap": overlap,
            "rows": {k: v.to_dict() for k, v in results.items()},
        }
        write_text(args.json, json.dumps(payload, indent=1))
