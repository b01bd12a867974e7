"""Options shared by the commands: defaults (= configs/default.yaml), YAML config files, value
checks made before any model loads, and loading the model the options name."""

from __future__ import annotations

import argparse
import math
import os
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
    "dtype": "auto",  # the dtype the model ships in where the device runs it natively (kvquant.io.dtypes.auto_dtype)
    "device": "cpu",
    "baselines": "fp,int8,int4,int4-channel,fp8,fp4,lloydmax@4,uniform@4,lambda@4,lambda-lloyd@4",
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PATHS = ("out", "json", "text_file", "codebooks")  # config-file keys beyond DEFAULTS, all strings


#: Allowed ranges (inclusive; None: unbounded) of the numeric options, checked before any model loads.
RANGES = {"seqlen": (2, None), "samples": (1, None), "windows": (1, None), "bits_q": (1, 8), "bits_k": (1, 8),
          "group": (2, None), "sink": (0, None), "outliers": (0.0, 0.5), "budget": (0.0, 8.0),
          "effective_bits": (0.0, 16.0), "bits_v": (0, 8), "seeds": (1, None), "max_new_tokens": (1, None)}


def config_values(path: str | None) -> dict:
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


def resolve_options(args: argparse.Namespace, keys: list[str]) -> argparse.Namespace:
    """Command line > config file > DEFAULTS, for every key (and the config file's values of any
    other option this command has, paths included); then every value checked (types and ranges,
    output paths writable, inputs readable) — before any model is loaded."""
    cfg = config_values(getattr(args, "config", None))
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
        given = [k for k in args.from_config if option_name(k) in str(e).split()]
        raise ValueError(f"{e} (from config file {args.config})" if given else str(e)) from None
    return args


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_values(args: argparse.Namespace) -> None:
    """Ranges of the numeric options, the dtype, and every output path writable before work starts."""
    for key, (low, high) in RANGES.items():
        v = getattr(args, key, None)
        if v is None:
            continue
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"{option_name(key)} must be {span}, got {v}")
    if getattr(args, "dtype", None) is not None and args.dtype not in (*DTYPES, "auto"):
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {args.dtype!r}")
    for key in ("out", "json", "text_file", "codebooks", "plots", "offload_folder"):
        if getattr(args, key, None) == "":
            raise ValueError(f"{option_name(key)} is empty: give a path")
    for key in ("out", "json"):
        if getattr(args, key, None):
            check_writable(option_name(key), getattr(args, key))
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


def load_model_of(args):
    """The model and tokenizer of ``--model`` in ``--dtype`` (``auto``: the dtype it ships in, where the
    device computes it natively, else float32 with a warning: :func:`kvquant.io.dtypes.auto_dtype`);
    ``args.dtype`` becomes the dtype loaded, for the tables."""
    from kvquant.io.assets import load_model

    placement = _placement(args)
    device = args.device if not placement else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, dtype="auto" if args.dtype == "auto" else DTYPES[args.dtype], device=device,
                            **placement)
    args.dtype = str(model.dtype).removeprefix("torch.")
    return (model if placement else model.to(args.device)), tok


def trained_context(model) -> int | None:
    """The model's trained context in tokens (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_context(model, seqlen: int, option: str, extra: int = 0) -> None:
    """``seqlen`` (+ ``extra`` generated) tokens within the model's trained context."""
    trained = trained_context(model)
    if trained and seqlen + extra > trained:
        plus = f" + {extra} generated tokens" if extra else ""
        raise ValueError(f"{option} {seqlen}{plus} is beyond the model's trained context ({trained} tokens): "
                         f"use at most {trained - extra}")


def comma_numbers(option: str, text: str, kind=float) -> list:
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


def option_text(e: ValueError) -> str:
    """The message of ``e``, with the configuration fields a :class:`~kvquant.codebooks.ConfigError`
    names written as the options that set them (``scale_bits`` as ``--scale-bits``)."""
    from kvquant.codebooks import ConfigError

    return e.naming(option_name) if isinstance(e, ConfigError) else str(e)
