"""kvquant: quantized queries, keys and values for Hugging Face causal LMs, with codebooks from the
optimal point density for products. Run "kvquant COMMAND --help" for a command's options.

Options may also come from a YAML file (--config configs/default.yaml) whose keys are the
long option names with _ for - ; options given on the command line win.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import traceback
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from kvquant.io.fileio import probe_write

DEFAULTS = {  # = configs/default.yaml (tests/test_cli.py checks)
    "model": "smollm2-135m",
    "dataset": "enwiki-excerpt",
    "seqlen": 2048,
    "samples": 8,
    "windows": 8,
    "bits_q": 4,
    "bits_k": 4,
    "method": "lambda-lloyd",
    "norm": "channel-group",
    "group": 64,
    "sink": 1,
    "outliers": 0.0,
    "rope": "pre",
    "budget": 0.0,
    "effective_bits": 3.65,
    "budget_sides": "k",
    "bits_v": 4,
    "scale_bits": 8,
    "dtype": "auto",  # the dtype the model ships in (kvquant.io.assets.shipped_dtype)
    "device": "cpu",
    "baselines": "fp,int8,int4,int4-channel,fp8,fp4,lloydmax@4,uniform@4,lambda@4,lambda-lloyd@4",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATHS = ("out", "json", "text_file", "codebooks")  # config-file keys beyond DEFAULTS, all strings
#: Allowed ranges (inclusive; None: unbounded) of the numeric options, checked before any model loads.
RANGES = {"seqlen": (2, None), "samples": (1, None), "windows": (1, None), "bits_q": (1, 8), "bits_k": (1, 8),
          "group": (2, None), "sink": (0, None), "outliers": (0.0, 0.5), "budget": (0.0, 8.0),
          "effective_bits": (0.0, 16.0), "bits_v": (0, 8), "seeds": (1, None), "max_new_tokens": (1, None)}


def _config_values(path: str | None) -> dict:
    """The options of a YAML config file, keys with ``_`` for ``-``, each checked for its type."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} " + ("is a directory, not a YAML file" if p.is_dir() else "not found"))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = set(values) - set(DEFAULTS) - set(PATHS)
    if unknown:
        raise ValueError(f"config file {p}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted([*DEFAULTS, *PATHS]))})")
    for k, v in values.items():
        want = type(DEFAULTS.get(k, ""))
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
              isinstance(v, want) and not isinstance(v, bool) if want is int else isinstance(v, str))
        if not ok:
            kind = {int: "an integer", float: "a number", str: "a string"}[want]
            raise ValueError(f"config file {p}: {k} must be {kind}, got {v!r}")
    return values


#: Config-file keys a command does not take from the file although it has an option of that name:
#: ``bits_v`` is the codebook file's value bits in ``calibrate`` but a run's override elsewhere.
_NOT_FROM_CONFIG = {"eval-ppl": {"bits_v"}, "eval-passkey": {"bits_v"}, "generate": {"bits_v"}}


def _resolve(args: argparse.Namespace, keys: list[str]) -> argparse.Namespace:
    """Command line > config file > DEFAULTS, for every key (and the config file's values of any
    other option this command has, paths included); then every value checked (types and ranges,
    output paths writable, inputs readable) — before any model is loaded."""
    cfg = _config_values(getattr(args, "config", None))
    skip = _NOT_FROM_CONFIG.get(getattr(args, "command", ""), set())
    args.defaulted = set()  # options that no one gave (calibration_config adapts the family-specific ones)
    args.from_config = set()
    for k in dict.fromkeys([*keys, *cfg]):
        if k in skip or not hasattr(args, k) and k not in keys or getattr(args, k, None) is not None:
            continue
        if k in cfg:
            args.from_config.add(k)
        else:
            args.defaulted.add(k)
        setattr(args, k, cfg.get(k, DEFAULTS.get(k)))
    try:
        _check_values(args)
    except ValueError as e:
        given = [k for k in args.from_config if _option(k) in str(e).split()]
        raise ValueError(f"{e} (from config file {args.config})" if given else str(e)) from None
    return args


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_values(args: argparse.Namespace) -> None:
    """Ranges of the numeric options, the dtype, and every output path writable before work starts."""
    for key, (low, high) in RANGES.items():
        v = getattr(args, key, None)
        if v is None:
            continue
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"{_option(key)} must be {span}, got {v}")
    if getattr(args, "dtype", None) is not None and args.dtype not in (*DTYPES, "auto"):
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {args.dtype!r}")
    for key in ("out", "json", "text_file", "codebooks", "plots", "offload_folder"):
        if getattr(args, key, None) == "":
            raise ValueError(f"{_option(key)} is empty: give a path")
    for key in ("out", "json"):
        if getattr(args, key, None):
            check_writable(_option(key), getattr(args, key))
    if getattr(args, "plots", None):
        check_writable("--plots", args.plots, folder=True)
    if getattr(args, "text_file", None):
        f = Path(args.text_file).expanduser()
        if not f.is_file():
            raise ValueError(f"--text-file {args.text_file}: " + ("is a directory, not a text file" if f.is_dir() else
                                                                  "no such file"))
    if getattr(args, "device", None) is not None:
        _check_device(args.device)


def _check_device(device: str) -> None:
    """``--device``: a device torch knows and this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda, cuda:0 …") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device here (torch {torch.__version__} sees none); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {device}: kvquant runs on cpu or cuda")


def check_writable(option: str, path: str | os.PathLike, folder: bool = False) -> None:
    """Raise ValueError naming ``option`` unless a file can be written at ``path`` (its folder created
    if missing) — or, with ``folder``, files inside the folder ``path``: not a directory (a file)
    itself, the nearest existing ancestor a writable directory."""
    p = Path(path).expanduser()
    if p.is_dir() and not folder:
        raise ValueError(f"{option} {p} is a directory: give a file name")
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{option} {p} is a file, not a folder")
    parent = p if folder and p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        probe_write(parent)
        if p.is_file() and not folder:  # an existing target that cannot be replaced (e.g. immutable)
            with open(p, "ab"):
                pass
    except OSError as e:
        where = p if p.is_file() and not folder else f"in {parent}"
        raise ValueError(f"{option} {path}: cannot write {where} ({e.strerror or e}); choose a writable place") from None


def _placement(args) -> dict:
    """``from_pretrained`` placement options of ``--device-map`` (with ``--max-memory`` and
    ``--offload-folder``): accelerate's big-model inference; {} without it."""
    from kvquant.hf.placement import parse_max_memory

    device_map = getattr(args, "device_map", None)
    if not device_map:
        if getattr(args, "max_memory", None) or getattr(args, "offload_folder", None):
            raise ValueError("--max-memory and --offload-folder would be ignored: give them with --device-map auto")
        return {}
    out = {"device_map": device_map}
    if args.max_memory:
        out["max_memory"] = parse_max_memory(args.max_memory)
    if args.offload_folder:
        check_writable("--offload-folder", args.offload_folder, folder=True)
        out["offload_folder"] = args.offload_folder
    return out


def _load(args):
    """The model and tokenizer of ``--model`` in ``--dtype`` (``auto``: the dtype it ships in);
    ``args.dtype`` becomes the dtype loaded, for the tables."""
    from kvquant.io.assets import load_model

    placement = _placement(args)
    model, tok = load_model(args.model, dtype="auto" if args.dtype == "auto" else DTYPES[args.dtype], **placement)
    args.dtype = str(model.dtype).removeprefix("torch.")
    return (model if placement else model.to(args.device)), tok


def cmd_assets(args) -> None:
    from kvquant.io import assets

    if args.list:
        if args.force or args.names:
            raise ValueError("--list only lists the asset names: drop --force and the names, or --list")
        for name, desc in assets.list_assets().items():
            print(f"{name:20s} {desc}")
        return
    for name, path in assets.fetch_all(args.names or None, force=args.force).items():
        print(f"{name}: {path}")


def codebook_config(options: dict):
    """The :class:`CodebookConfig` named by command-line/config-file ``options`` (e.g. ``DEFAULTS``)."""
    from kvquant.codebooks import CodebookConfig

    return CodebookConfig(**{f.name: options[f.name] for f in fields(CodebookConfig) if f.name in options})


def _family_options(options: dict, defaulted: set[str]) -> dict:
    """``options`` with the default family's own options (8-bit scales, the ``effective_bits`` target,
    keys-only allocation) set to 16, off and "qk" where no one gave them and a static ``norm`` or a
    ``budget`` makes them moot."""
    options = dict(options)
    if _bits_as_target(options, defaulted):  # --bits-q B --bits-k B: Q·Kᵀ at B bits per entry, every bit counted
        options["effective_bits"] = float(options["bits_q"])
        if "budget_sides" in defaulted:
            options["budget_sides"] = "qk"
    if options["norm"] != "channel-group":
        for k, neutral in (("scale_bits", 16), ("effective_bits", 0.0), ("budget_sides", "qk")):
            if k in defaulted:
                options[k] = neutral
    if options.get("budget") and "effective_bits" in defaulted:
        options["effective_bits"] = 0.0
    return options


def _bits_as_target(options: dict, defaulted: set[str]) -> bool:
    """Whether ``--bits-q B --bits-k B`` (both given, equal, no --effective-bits or --budget) set the
    target: B effective bits per query and key entry, group scales and sinks included (the default
    family's keys-only target would otherwise apply)."""
    return (not {"bits_q", "bits_k"} & set(defaulted) and {"effective_bits", "budget"} <= set(defaulted)
            and options["bits_q"] == options["bits_k"] and options["norm"] == "channel-group")


def calibration_config(options: dict, head_dim: int, seqlen: int, defaulted: set[str] = frozenset()):
    """The :class:`CodebookConfig` ``kvquant calibrate`` builds from ``options``, ``defaulted`` the
    names that came from ``DEFAULTS`` (no one gave them): the default family's own options — 8-bit
    scales, the ``effective_bits`` target and keys-only allocation — fall back to 16, off and "qk"
    for a static ``norm``, a
    ``budget`` given replaces the default target, and ``effective_bits`` > 0 sets the budget for
    exactly that many bits (:meth:`CodebookConfig.at_effective_bits`; caps ``bits_q``/``bits_k``
    where both were given, else ⌈budget⌉ + 2)."""
    options = _check_combination(options, defaulted)
    target = options.get("effective_bits")
    config = codebook_config(options)
    if not target:
        return config
    caps = None if {"bits_q", "bits_k"} & set(defaulted) else (options["bits_q"], options["bits_k"])
    try:
        return config.at_effective_bits(target, head_dim, seqlen, caps)
    except ValueError as e:
        raise ValueError(f"--effective-bits {target:g}: {as_options(str(e))}; raise --effective-bits, or use a longer "
                         "--seqlen or --group (the scales and the exact sink cost less per entry)") from None


def cmd_calibrate(args) -> None:
    from kvquant.hf import distributed
    from kvquant.hf.calibrate import CalibrationConfig, calibrate, summary
    from kvquant.io.data import load_text, make_windows
    from kvquant.io.fingerprint import ModelFingerprint

    _resolve(args, ["model", "dataset", "seqlen", "samples", "bits_q", "bits_k", "method", "norm", "group", "sink",
                    "outliers", "rope", "budget", "effective_bits", "budget_sides", "bits_v", "scale_bits", "dtype",
                    "device", "out"])
    if not args.out:
        raise ValueError("--out FILE is required (where to write the codebooks)")
    _check_combination(vars(args), args.defaulted)
    text = load_text(args.text_file) if args.text_file else load_text(args.dataset, split="train")
    source = args.text_file or args.dataset
    args.device = distributed.init(args.device)  # one process of `accelerate launch`, or alone
    if distributed.world()[1] > 1 and args.device_map:
        raise ValueError("--device-map places one model over several devices; with several processes each holds "
                         "its own copy: drop one of them")
    model, tok = _load(args)
    _check_context(model, args.seqlen, "--seqlen")
    config = calibration_config(vars(args), ModelFingerprint.from_model(model).head_dim, args.seqlen, args.defaulted)
    if _bits_as_target(vars(args), args.defaulted):
        print(f"--bits-q {args.bits_q} --bits-k {args.bits_k}: {args.bits_q} effective bits per query and key entry, "
              f"every bit counted (code bits water-filled over the channels, at most {args.bits_q}, to pay for the group "
              f"scales and the exact sink) — as --effective-bits {args.bits_q} --budget-sides qk; give --effective-bits 0 "
              f"for {args.bits_q} code bits everywhere", file=sys.stderr)
    args.budget, args.bits_q, args.bits_k = config.budget, config.bits_q, config.bits_k
    config = CalibrationConfig(config)
    windows = make_windows(tok, text, args.seqlen, args.samples, from_end=True, source=source)
    books = calibrate(model, windows, config, source=source)
    if not distributed.is_main():  # every process built the same codebooks; the main one writes them
        return
    books.save(args.out)
    print("\n".join(summary(books)))
    bits = (f"q {args.bits_q} bits, k {args.bits_k} bits" if not args.budget else
            f"q {books.q.mean_bits:.3f} / k {books.k.mean_bits:.3f} mean bits (budget {args.budget:g}, caps "
            f"{args.bits_q}/{args.bits_k})")
    per = "per key entry (queries unallocated)" if books.config.budget_sides == "k" else "per q/k entry"
    values = f", values {books.config.bits_v} bits in the KV cache" if books.config.bits_v else ""
    print(f"wrote {args.out}: {args.method}, {bits}, {books.effective_bits(seqlen=args.seqlen):.3f} effective bits "
          f"{per}{values}, {windows.n} windows × {args.seqlen} tokens from the end of {source}")


def _check_combination(options: dict, defaulted: set[str]) -> dict:
    """:func:`_family_options` of ``options``, refusing combinations where one option would be
    silently overridden or ignored (errors that say why and what to give instead)."""
    options = _family_options(options, defaulted)
    given = {"bits_q", "bits_k"} - set(defaulted)
    if options["effective_bits"] and options["budget"]:
        raise ValueError("give --effective-bits (every bit counted) or --budget (code bits only), not both")
    if options["effective_bits"] and len(given) == 1:
        raise ValueError(f"{_option(given.pop())} alone would be ignored: under --effective-bits, --bits-q and --bits-k "
                         "are together the most bits one channel may get; give both, or --effective-bits 0 for fixed bits")
    if "budget_sides" not in defaulted and not (options["budget"] or options["effective_bits"]):
        raise ValueError("--budget-sides would be ignored: it says what --effective-bits/--budget spread bits over; "
                         "give one of them, or drop --budget-sides")
    if options["norm"] != "channel-group" and "group" not in defaulted:
        raise ValueError(f"--group would be ignored: it is the token group of --norm channel-group, not of --norm "
                         f"{options['norm']}; drop it or use --norm channel-group")
    try:
        codebook_config(options)  # the configuration's own checks, before any model loads
    except ValueError as e:
        raise ValueError(as_options(str(e))) from None
    return options


def as_options(message: str) -> str:
    """``message`` with the configuration's field names (``scale_bits``) as the options that set
    them (``--scale-bits``)."""
    return re.sub(r"(?<![-'\"\w])(" + "|".join(sorted(DEFAULTS, key=len, reverse=True)) + r")\b(?![-'\"])",
                  lambda m: _option(m[1]) if "_" in m[1] or m[1] in ("budget", "group", "sink", "outliers", "norm", "rope",
                                                                     "method") else m[1], message)


def _rows(baselines: str, books, own: bool, seqlen: int | None, generation: bool) -> dict:
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


def _trained_context(model) -> int | None:
    """The model's trained context in tokens (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _check_context(model, seqlen: int, option: str, extra: int = 0) -> None:
    """``seqlen`` (+ ``extra`` generated) tokens within the model's trained context."""
    trained = _trained_context(model)
    if trained and seqlen + extra > trained:
        plus = f" + {extra} generated tokens" if extra else ""
        raise ValueError(f"{option} {seqlen}{plus} is beyond the model's trained context ({trained} tokens): "
                         f"use at most {trained - extra}")


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


def cmd_eval_ppl(args) -> None:
    from kvquant.codebooks import Codebooks
    from kvquant.io.data import calibration_overlap, load_text, make_windows
    from kvquant.io.fileio import write_text
    from kvquant.evaluation.generation import cache_factories, evaluate_generation
    from kvquant.evaluation.perplexity import evaluate, format_table

    _resolve(args, ["model", "dataset", "seqlen", "windows", "baselines", "dtype", "device"])
    books = Codebooks.load(args.codebooks) if args.codebooks else None
    rows = _rows(args.baselines, books, own=books is not None, seqlen=args.seqlen, generation=args.mode == "generation")
    if args.mode != "generation" and books is not None and books.config.budget_sides == "k":
        rows = _keys_only_own_row(rows, books)
    if args.mode == "generation":
        _check_rows_quantize(rows, args.seqlen)
    if args.bits_v is not None and args.mode != "generation":
        raise ValueError("--bits-v quantizes the values a KV cache holds: give it with --mode generation")
    if args.values is not None and not args.bits_v:
        raise ValueError("--values normalises quantized values: give it with --mode generation --bits-v B")
    if args.allow_overlap and books is None:
        raise ValueError("--allow-overlap would be ignored: it allows evaluation windows that overlap a codebook "
                         "file's calibration; give --codebooks or drop it")
    source = args.text_file or args.dataset
    text = load_text(args.text_file) if args.text_file else load_text(args.dataset, split="test")
    model, tok = _load(args)
    if books is not None:
        books.check_fits(model)
    _check_context(model, args.seqlen, "--seqlen")
    windows = make_windows(tok, text, args.seqlen, args.windows, from_end=False, source=source)
    overlap = calibration_overlap(books.calibration, windows) if books is not None else None
    if overlap and not args.allow_overlap:
        raise ValueError(f"{overlap}: the table would not be held out. Use fewer --windows or --seqlen, calibrate on "
                         f"other text, or give --allow-overlap to report it labelled NOT HELD OUT")
    if args.mode == "generation":
        results = evaluate_generation(model, windows, cache_factories(model, rows, args.bits_v or 0, args.values or "minmax"))
    else:
        results = evaluate(model, windows, rows)
    values = (f"{args.bits_v}-bit values ({args.values or 'minmax'} per token)" if args.bits_v else
              "values as each row's cache holds them (a row's /V, else the codebooks' bits_v, else exact)")
    mode = (f" · generation mode (every token reads the KV cache; queries exact; {values})"
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
            "values": (args.values or "minmax") if args.bits_v else None,
            "bos_prepended": windows.bos_prepended, "dtype": args.dtype,
            "codebooks": str(args.codebooks) if args.codebooks else None,
            "held_out": overlap is None, "overlap": overlap,
            "rows": {k: v.to_dict() for k, v in results.items()},
        }
        write_text(args.json, json.dumps(payload, indent=1))


def _numbers(option: str, text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:  # the same cell twice would be counted as two trials
        raise ValueError(f"{option} lists {', '.join(f'{v:g}' for v in repeated)} more than once: give each value once")
    return values


def cmd_eval_passkey(args) -> None:
    from kvquant.codebooks import Codebooks
    from kvquant.io.data import needs_bos
    from kvquant.io.fileio import atomic_paths
    from kvquant.evaluation.generation import cache_factories
    from kvquant.evaluation.passkey import ANSWER_TOKENS, format_passkey, passkey_prompt, plot_heatmap, run_passkey

    _resolve(args, ["model", "dtype", "device"])
    lengths = _numbers("--lengths", args.lengths, int) if args.lengths is not None else None
    if lengths and min(lengths) < 1:
        raise ValueError(f"--lengths are token counts >= 1, got {args.lengths}")
    depths = _numbers("--depths", args.depths)
    if any(not 0 <= d <= 100 for d in depths):
        raise ValueError(f"--depths are percentages in 0..100, got {args.depths}")
    if args.plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plots needs matplotlib: pip install 'kvquant-density[plot]'")
    books = Codebooks.load(args.codebooks) if args.codebooks else None
    seqlen = int(books.calibration["seqlen"]) if books is not None else None
    rows = _rows(args.baselines or "fp", books, own=books is not None, seqlen=seqlen, generation=True)
    model, tok = _load(args)
    if books is not None:
        books.check_fits(model)
    trained = _trained_context(model)
    lengths = lengths or [n for n in (1024, 2048, 4096, 8192, 16384, 32768)
                          if trained is None or n + ANSWER_TOKENS <= trained]
    if not lengths:
        raise ValueError(f"the model's trained context ({trained} tokens) is below the default lengths "
                         f"(1024 + {ANSWER_TOKENS} answer tokens and up): give --lengths")
    _check_context(model, max(lengths), "--lengths", extra=ANSWER_TOKENS)
    for n in lengths:  # too short for the prompt's fixed parts: an error before the first answer
        try:
            passkey_prompt(tok, n, 0.5, 0, bos=needs_bos(tok))
        except ValueError as e:
            raise ValueError(f"--lengths: {e}") from None
    fractions = [d / 100 for d in depths]
    results = run_passkey(model, tok, cache_factories(model, rows, args.bits_v or 0, args.values or "minmax"),
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


def cmd_generate(args) -> None:
    from kvquant.cache import make_cache
    from kvquant.codebooks import Codebooks
    from kvquant.hf.compat import cache_kwargs
    from kvquant.evaluation.generation import kv_bits

    _resolve(args, ["model", "dtype", "device"])
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.bits_v == 0:
        raise ValueError("--bits-v 0: the cached values are quantized at 1..8 bits; leave --bits-v out for the "
                         "codebooks' own value bits")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as surrogate escapes
        raise ValueError("--prompt is not valid UTF-8 text: pass the prompt as UTF-8") from None
    books = Codebooks.load(args.codebooks)
    model, tok = _load(args)
    books.check_fits(model)
    cache = make_cache(model, books, bits_v=args.bits_v, values=args.values or "minmax")
    enc = tok(args.prompt, return_tensors="pt").to(args.device)
    if enc.input_ids.shape[1] == 0:
        raise ValueError("--prompt is empty after tokenization")
    trained, held = _trained_context(model), enc.input_ids.shape[1]
    if trained and held + args.max_new_tokens > trained:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the prompt's {held} tokens + {args.max_new_tokens} "
                         f"are beyond the model's trained context ({trained} tokens): use at most {trained - held}")
    with torch.no_grad():
        out = model.generate(**enc, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    bits, per_token = kv_bits(cache)
    print(f"KV cache: {per_token:.0f} bytes per token held ({bits:.2f} bits per K/V entry, everything counted) "
          f"vs {cache.fp16_bytes_per_token()} for an fp16 cache; {cache.quantized_tokens()} of {cache.get_seq_length()} "
          f"tokens quantized (the sink and the newest incomplete group of {books.k.group or 1} stay exact)",
          file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``kvquant CMD: error: …``, exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kvquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="fetch the offline default model and corpus into $KVQUANT_HOME")
    a.add_argument("names", nargs="*", help="asset names (default: all); see --list")
    a.add_argument("--list", action="store_true", help="list the offline asset names")
    a.add_argument("--force", action="store_true",
                   help="delete what the cache holds of these assets and fetch them again (repairs a damaged cache)")
    a.set_defaults(func=cmd_assets)

    def model_options(p):
        p.add_argument("--model", help=f"offline name, local folder or hub id (default {DEFAULTS['model']})")
        p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default auto: the dtype the model ships in, "
                       "bfloat16 for the offline models)")
        p.add_argument("--device", help="cpu, cuda, cuda:0 … (default cpu)")
        p.add_argument("--device-map", help="auto | balanced | sequential: place the layers over the GPUs, the CPU and "
                       "disk with accelerate (models larger than one device; replaces --device)")
        p.add_argument("--max-memory", help="with --device-map: memory per device, e.g. 0=20GiB,cpu=8GiB")
        p.add_argument("--offload-folder", help="with --device-map: folder for the layers offloaded to disk")

    def common(p):
        p.add_argument("--config", help="YAML file of options (e.g. configs/default.yaml)")
        model_options(p)
        p.add_argument("--dataset", help=f"corpus name or datasets id (default {DEFAULTS['dataset']})")
        p.add_argument("--text-file", help="a local text file instead of --dataset")
        p.add_argument("--seqlen", type=int, help=f"tokens per window (default {DEFAULTS['seqlen']})")

    c = sub.add_parser("calibrate", help="capture q/k pair statistics and write codebooks")
    common(c)
    c.add_argument("--samples", type=int, help="calibration windows, taken from the END of the text (default 8)")
    c.add_argument("--bits-q", type=int, help="bits per query entry (1-8, default 4); with --budget or "
                   "--effective-bits, the most one channel may get")
    c.add_argument("--bits-k", type=int, help="bits per key entry (1-8, default 4); with --budget or "
                   "--effective-bits, the most one channel may get")
    c.add_argument("--method", choices=["lambda", "lambda-lloyd", "lloydmax", "uniform"], help="codebook method (default lambda-lloyd)")
    c.add_argument("--norm", choices=["head", "channel", "channel-token", "channel-group"],
                   help="static per head / per channel (μ, σ), static per channel with a scale per token "
                        "(channel-token), or dynamic min–max per channel over groups of tokens (default channel-group)")
    c.add_argument("--group", type=int, help="tokens per group for --norm channel-group (default 64)")
    c.add_argument("--sink", type=int, help="first tokens of each sequence kept exact (default 1)")
    c.add_argument("--outliers", type=float,
                   help="fraction of the entries of each (head, group) block kept exact with their positions "
                        "(dense-and-sparse; --norm channel-group only; default 0)")
    c.add_argument("--rope", choices=["post", "pre"],
                   help="quantize q and k after the rotary embedding, or before it (undone and redone inside "
                        "attention; the KV cache stores them before the rotation; default pre)")
    c.add_argument("--budget", type=float,
                   help="average code bits per query/key entry, spread over (layer, head, channel) by reverse "
                        "water-filling on the calibrated diagonal-Fisher loss estimate; each channel gets 2, 3, 4, 5, 8, … "
                        "levels (3 and 5 packed at 1.6 and 2.33 bits), at most 2^--bits-q / 2^--bits-k (--norm "
                        "channel-group only; replaces the default --effective-bits)")
    c.add_argument("--effective-bits", type=float,
                   help="bits per entry (per key entry with --budget-sides k) with every bit counted — codes, group "
                        "scales, exact sink tokens and incomplete group at --seqlen: sets --budget to the code bits that "
                        "make exactly this many (e.g. 4 with --group 128 --scale-bits 8 --sink 1 at seqlen 2048: 3.867); "
                        "channels then get up to --bits-q/--bits-k bits, by default ⌈budget⌉ + 2 (default 3.65 for "
                        "--norm channel-group, keys only: with 4-bit values 3.99 K/V bits held on SmolLM2-135M; "
                        "0 = off, every channel at --bits-q/--bits-k)")
    c.add_argument("--budget-sides", choices=["qk", "k"],
                   help="what the code budget is spread over: qk = queries and keys (the simulated Q·Kᵀ), k = the "
                        "keys alone (a KV cache with exact queries; --effective-bits then counts key entries; default k)")
    c.add_argument("--bits-v", type=int,
                   help="bits of the values the KV cache of these codebooks stores (make_cache's default; "
                        "0 = the keys' mean code bits; default 4)")
    c.add_argument("--scale-bits", type=int, choices=[16, 8],
                   help="bits of each stored per-group mid and half-range (--norm channel-group): 16 = fp16, "
                        "8 = log-coded half-range and offset in its 16ths (default 8 for --norm channel-group)")
    c.add_argument("--out", help="codebook file to write (.safetensors)")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval-ppl", help="perplexity, KL divergence from fp and top-token agreement: unquantized, "
                       "baselines and codebooks in one run")
    common(e)
    e.add_argument("--windows", type=int, help="evaluation windows, the FIRST N of the text (default 8)")
    e.add_argument("--codebooks", help="codebook file from `kvquant calibrate`")
    e.add_argument("--baselines", help=f"comma-separated rows (default {DEFAULTS['baselines']}); METHOD@B (e.g. "
                   "lambda@2): that codebook method rebuilt from --codebooks' statistics at exactly B effective bits; "
                   "fp is always run (first, per window): every row's KLD and top-1 are measured against it")
    e.add_argument("--mode", choices=["simulated", "generation"], default="simulated",
                   help="simulated: q and k quantized inside one forward pass per window (default); generation: "
                        "every token reads the keys (and values) a KV cache returns — fp through transformers' "
                        "DynamicCache, codebook rows through kvquant's cache, queries exact")
    e.add_argument("--bits-v", type=int, help="--mode generation: bits of the cached values (default: each row's /V, else the file's bits_v)")
    e.add_argument("--values", choices=["rms", "minmax"],
                   help="with --bits-v: values per token as asymmetric INT over head_dim with 8-bit mid/half "
                        "(minmax, default) or v/RMS through the ρ = 0 codebook (rms)")
    e.add_argument("--json", help="write the rows to this JSON file")
    e.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even where the windows overlap the codebooks' calibration windows (same text); "
                        "the table is then labelled NOT HELD OUT (default: refused)")
    e.set_defaults(func=cmd_eval_ppl)

    k = sub.add_parser("eval-passkey", help="long-context retrieval (passkey) through each row's KV cache")
    k.add_argument("--config", help="YAML file of options (e.g. configs/default.yaml)")
    model_options(k)
    k.add_argument("--codebooks", help="codebook file from `kvquant calibrate`")
    k.add_argument("--baselines", help="comma-separated rows as in eval-ppl --mode generation (fp, the file's own "
                   "method, METHOD@K/V, kivi@B/V, quanto@B); fp is always run (default: fp and the file's own)")
    k.add_argument("--lengths", help="prompt lengths in tokens (default 1024, 2048, … up to the model's trained context)")
    k.add_argument("--depths", default="0,25,50,75,100", help="where the key sits, percent of the filler (default 0,25,50,75,100)")
    k.add_argument("--seeds", type=int, default=3, help="prompts (keys) per length and depth (default 3)")
    k.add_argument("--bits-v", type=int, help="bits of the cached values (default: each row's /V, else the file's)")
    k.add_argument("--values", choices=["minmax", "rms"], help="value normalisation per token (default minmax)")
    k.add_argument("--json", help="write accuracies and every answer to this JSON file")
    k.add_argument("--plots", help="folder for one accuracy heatmap (depth × length) PNG per row (the plot extra)")
    k.set_defaults(func=cmd_eval_passkey)

    g = sub.add_parser("generate", help="greedy continuation of a prompt through kvquant's quantized KV cache")
    g.add_argument("--codebooks", required=True, help="codebook file from `kvquant calibrate`")
    g.add_argument("--prompt", required=True, help="the text to continue")
    model_options(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--bits-v", type=int, help="bits of the cached values (default: the keys' mean code bits)")
    g.add_argument("--values", choices=["minmax", "rms"], help="value normalisation per token (default minmax)")
    g.set_defaults(func=cmd_generate)
    return ap


#: What a run reports as one line (exit 2) rather than a traceback: bad options and files, missing
#: or damaged assets (AssetError is a RuntimeError), I/O failures, NaN/inf (FloatingPointError).
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success; 2 with one line ``kvquant CMD: error: …`` on stderr for a bad
    input or a fault (the traceback too with ``-v``); 130 on Ctrl-C. SIGTERM/SIGHUP exit through
    ``SystemExit`` (status 128 + signal) so that every temp file is removed on the way."""
    from kvquant.io.fileio import signals_raise

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with signals_raise():
            args.func(args)
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"kvquant {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvquant {args.command}: interrupted (nothing half-written is left)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
