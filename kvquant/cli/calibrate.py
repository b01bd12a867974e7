"""``kvquant calibrate``: pair statistics from calibration windows, written as codebooks."""

from __future__ import annotations

import sys
from dataclasses import fields

from kvquant.cli.options import (
    check_context,
    load_model_of,
    option_name,
    resolve_options,
    option_text,
)


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
        raise ValueError(f"--effective-bits {target:g}: {option_text(e)}; raise --effective-bits, or use a longer "
                         "--seqlen or --group (the scales and the exact sink cost less per entry)") from None


def cmd_calibrate(args) -> None:
    from kvquant.hf import distributed
    from kvquant.hf.calibrate import CalibrationConfig, calibrate, summary
    from kvquant.io.data import load_text, make_windows
    from kvquant.io.fingerprint import ModelFingerprint

    resolve_options(args, ["model", "dataset", "seqlen", "samples", "bits_q", "bits_k", "method", "norm", "group", "sink",
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
    model, tok = load_model_of(args)
    check_context(model, args.seqlen, "--seqlen")
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
        raise ValueError(f"{option_name(given.pop())} alone would be ignored: under --effective-bits, --bits-q and --bits-k "
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
        raise ValueError(option_text(e)) from None
    return options
