"""The ``kvquant`` command: one module per sub-command (``calibrate``, ``eval_ppl``, ``eval_passkey``,
``generate``, ``assets``), the options they share (:mod:`kvquant.cli.options`) and the parser
(:mod:`kvquant.cli.parser`). :func:`main` runs one command and turns user errors into one line."""

from __future__ import annotations

import logging
import sys
import traceback

from kvquant.cli.calibrate import calibration_config, codebook_config
from kvquant.cli.options import DEFAULTS, config_values, check_writable
from kvquant.cli.parser import build_parser

__all__ = ["DEFAULTS", "USER_ERRORS", "build_parser", "calibration_config", "check_writable", "codebook_config", "main",
           "config_values"]


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
