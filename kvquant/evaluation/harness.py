"""lm-evaluation-harness model type ``kvquant``: any lm-eval task through kvquant's quantized KV cache.

    python -m kvquant.evaluation.harness --model kvquant \\
        --model_args pretrained=smollm2-135m,codebooks=out/default.safetensors,device=cpu \\
        --tasks hellaswag --batch_size 1

:class:`KVQuantLM` is lm-eval's own ``HFLM`` with the model and tokenizer of
:func:`kvquant.io.assets.load_model` (offline names, local folders, hub ids) and one change: every
token reads the keys and values a cache returns. Loglikelihood requests (and the windows of
``loglikelihood_rolling``) feed each sequence through a fresh cache in the chunks of
:func:`kvquant.evaluation.generation.cache_logits` — what token-by-token decoding gives, as
``kvquant eval-ppl --mode generation`` measures it; ``generate_until`` passes a fresh cache to
``model.generate`` (greedy unless the task asks to sample). With ``codebooks=FILE`` the cache is
:func:`kvquant.make_cache` (``KVQuantCache``: keys as calibrated, values at ``bits_v``); without
it, transformers' ``DynamicCache`` — the unquantized model on the same path, so the two runs are
comparable.

lm-eval 0.4.13 (the newest release) does not discover model types of installed packages:
``lm_eval --model kvquant`` knows the name only where this module was imported first. Hence
``python -m kvquant.evaluation.harness ARGS`` (lm-eval's command line after the import), or in Python
``import kvquant.evaluation.harness`` before ``lm_eval.simple_evaluate(model="kvquant", ...)``.
pyproject.toml also declares the entry point ``lm_eval.models: kvquant`` that lm-eval's proposed
plugin discovery (EleutherAI/lm-evaluation-harness#4013) reads.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"kvquant.evaluation.harness needs lm-evaluation-harness: pip install 'kvquant-density[lm-eval]' ({e})") from e
from transformers.cache_utils import Cache, DynamicCache

from kvquant.evaluation.generation import cache_logits
from kvquant.hf.compat import cache_kwargs

__all__ = ["KVQuantLM", "main"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: model_args passed on to :func:`kvquant.make_cache` (only with ``codebooks=``).
CACHE_ARGS = ("bits_v", "values", "quantize_values", "residual", "sink", "decode")
#: model_args passed on unchanged to lm-eval's ``HFLM`` (its meaning there).
HFLM_ARGS = ("max_batch_size", "max_length", "add_bos_token", "prefix_token_id", "logits_cache", "truncation",
             "softmax_dtype")
MODEL_ARGS = ("pretrained", "codebooks", *CACHE_ARGS, "dtype", "device", "batch_size", *HFLM_ARGS)
#: Whole-number model_args: (smallest, largest or None, what to write).
_WHOLE_ARGS = {
    "bits_v": (1, 8, "the bits of each cached value, e.g. bits_v=4; leave bits_v out for the codebook file's"),
    "residual": (0, None, "the newest tokens kept exact, e.g. residual=0"),
    "sink": (0, None, "the first tokens kept exact; leave sink out for the codebook file's"),
    "max_batch_size": (1, None, "the largest batch batch_size=auto tries"),
    "max_length": (1, None, "the longest sequence in tokens"),
    "prefix_token_id": (0, None, "a token id"),
}
#: True/false model_args.
_BOOL_ARGS = ("quantize_values", "add_bos_token", "logits_cache", "truncation")

#: HFLM's warnings for a model passed as an object, written for users who pass their own model
#: (kvquant loads it itself): dropped while HFLM.__init__ runs.
_HFLM_NOISE = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


class _DropHFLMNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HFLM_NOISE)


def _required_pretrained() -> ValueError:
    from kvquant.io.assets import MODELS

    return ValueError(f"model_args pretrained= is required: the model to evaluate, e.g. pretrained=smollm2-135m "
                      f"(offline names: {', '.join(MODELS)}), a local model folder or a hub id")


def _path(key: str, value: Any) -> str | None:
    """``pretrained``/``codebooks`` as a string (None where not given)."""
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        fix = ("e.g. pretrained=smollm2-135m or a local model folder" if key == "pretrained" else
               "the .safetensors file of `kvquant calibrate`, or leave codebooks out to run the unquantized model")
        raise ValueError(f"model_args {key}={value!r} is not a {'model name' if key == 'pretrained' else 'file'}: "
                         f"give {fix}")
    return value


def _whole(key: str, value: Any) -> int:
    """A whole-number model_arg (lm-eval passes ``9`` as int, ``banana`` or a JSON ``"9"`` as str)."""
    lo, hi, what = _WHOLE_ARGS[key]
    v = value
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        v = int(v)
    elif isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        span = f"{lo}–{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"model_args {key}={value!r}: use a whole number {span} ({what})")
    return v


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {key}={value!r}: use true or false")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"model_args {key}={value!r}: use one of {', '.join(choices)}")
    return value


def _checked(key: str, value: Any) -> Any:
    """One cache or HFLM model_arg, checked for its type and range before any model loads."""
    from kvquant.cache import DECODE_MODES, VALUE_NORMS

    if key in _WHOLE_ARGS:
        return _whole(key, value)
    if key in _BOOL_ARGS:
        return _bool(key, value)
    if key == "values":
        return _choice(key, value, VALUE_NORMS)
    if key == "decode":
        return _choice(key, value, DECODE_MODES)
    return value


def _batch_size(value: Any) -> int | str:
    """``batch_size``: a whole number >= 1 or ``auto``/``auto:N`` (lm-eval's ``--batch_size`` is a string)."""
    if isinstance(value, str) and re.fullmatch(r"auto(:\d+)?", value.strip()):
        return value.strip()
    v = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"model_args batch_size={value!r} (or --batch_size): use a whole number >= 1 or auto "
                         "(1 is best: each row runs through its own cache)")
    return v


def _device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``device=``; lm-eval's command line passes ``cuda:0`` unless told
    otherwise, so a CUDA device on a machine without CUDA falls back to the CPU (as lm-eval's
    ``hf`` model does), with a warning."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"model_args device={device!r} is not a torch device: use e.g. device=cpu or device=cuda:0") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device=%s but CUDA is not available: running on the CPU (pass device=cpu to silence this)", device)
        return torch.device("cpu")
    return dev


class KVQuantLM(HFLM):
    """lm-eval model type ``kvquant``: a causal LM whose every token reads a KV cache, kvquant's
    quantized one with ``codebooks``, else transformers' ``DynamicCache``.

    Args (``--model_args key=value,...``):
        pretrained: required: offline name (``smollm2-135m``, ``gemma3-270m``), local model folder or
            hub id (:func:`kvquant.io.assets.load_model`).
        codebooks: codebook file from ``kvquant calibrate`` (``.safetensors``) for this model; None
            runs the unquantized model through ``DynamicCache``.
        bits_v, values, quantize_values, residual, sink, decode: :func:`kvquant.make_cache`'s options
            (default: the file's; e.g. ``bits_v=4``); only with ``codebooks``.
        dtype: ``auto`` (default: the dtype the model ships in, bfloat16 for the offline models, where the
            device computes it natively, else float32: :func:`kvquant.io.dtypes.auto_dtype`),
            ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:0`` … (default: CUDA where available, else the CPU).
        batch_size: requests per batch (default 1). Each row of a batch still runs through its own
            cache, right padding included: a batch saves nothing here, so keep 1.
        max_batch_size, max_length, add_bos_token, prefix_token_id, logits_cache, truncation,
            softmax_dtype: passed to lm-eval's ``HFLM``.

    ``model_args`` take precedence over lm-eval's ``--batch_size``/``--device`` (whose defaults,
    1 and ``cuda:0``, lm-eval always passes).

    Every argument is checked (type and range) before the model loads; each error is one message
    naming the model_arg, what was given and what to write instead.

    Raises:
        ValueError: no ``pretrained``, an unknown key, a value of the wrong type or out of range
            (e.g. ``bits_v=9``, ``bits_v=banana``), a cache option without ``codebooks``, a bad
            ``dtype``/``device``, a file at ``codebooks`` that is no codebook file, or codebooks made
            for another model.
        FileNotFoundError: no file at ``codebooks``.
        kvquant.io.assets.AssetError: ``pretrained`` could not be found or loaded.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        codebooks: str | Path | None = None,
        bits_v: int | None = None,
        values: str | None = None,
        quantize_values: bool | None = None,
        residual: int | None = None,
        sink: int | None = None,
        decode: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(HFLM_ARGS))
        if unknown:
            raise ValueError(f"unknown model_args for --model kvquant: {', '.join(unknown)}; "
                             f"known: {', '.join(MODEL_ARGS)}")
        if pretrained is None or (isinstance(pretrained, str) and not pretrained.strip()):
            raise _required_pretrained()
        pretrained = _path("pretrained", pretrained)
        codebooks = _path("codebooks", codebooks)
        given = {"bits_v": bits_v, "values": values, "quantize_values": quantize_values, "residual": residual,
                 "sink": sink, "decode": decode}
        options = {k: _checked(k, v) for k, v in given.items() if v is not None}
        kwargs = {k: v if v is None else _checked(k, v) for k, v in kwargs.items()}
        if codebooks is None and options:
            raise ValueError(f"model_args {', '.join(options)} set kvquant's quantized cache: add codebooks=FILE "
                             "(from `kvquant calibrate`), or drop them to run the unquantized model (DynamicCache)")
        if not isinstance(dtype, torch.dtype) and not (isinstance(dtype, str) and dtype in (*DTYPES, "auto")):
            raise ValueError(f"model_args dtype={dtype!r}: use auto or one of {', '.join(DTYPES)}")
        batch_size = _batch_size(batch_size)
        dev = _device(device)
        from kvquant.codebooks import Codebooks
        from kvquant.io.assets import load_model

        books = None
        if codebooks is not None:
            try:
                books = Codebooks.load(codebooks)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"model_args codebooks={codebooks}: {e}, or leave codebooks out to run the "
                                        "unquantized model") from None
            except ValueError as e:
                raise ValueError(f"model_args codebooks={codebooks}: {e}") from None
        model, tokenizer = load_model(pretrained, dtype=DTYPES.get(dtype, dtype), device=dev)
        model.to(dev)
        if books is not None:
            try:
                books.check_fits(model)
            except ValueError as e:
                raise ValueError(f"model_args codebooks={codebooks} do not fit pretrained={pretrained} (pass the "
                                 f"codebooks calibrated for it): {e}") from None
        self.kv_pretrained = pretrained
        self.kv_codebooks_path = codebooks
        self.kv_codebooks = books
        self.kv_options = options
        noise = _DropHFLMNoise()
        hf_logger = logging.getLogger(HFLM.__module__)
        hf_logger.addFilter(noise)
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kwargs)
        finally:
            hf_logger.removeFilter(noise)
        try:
            self.new_cache()  # checks the cache options (and wraps the model for pre-RoPE keys) before any request
        except ValueError as e:
            given = ", ".join([f"codebooks={codebooks}", *(f"{k}={v!r}" for k, v in options.items())])
            raise ValueError(f"model_args {given}: {e}") from None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> KVQuantLM:
        """``--model_args`` as ``key=value,...``; lm-eval's ``additional_config`` (``batch_size``,
        ``max_batch_size``, ``device``) fills in only keys the string leaves out."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> KVQuantLM:
        """``model_args`` as a dict; ``additional_config`` fills in only keys it leaves out (lm-eval's
        own ``HFLM`` fails on a key given in both, and its command line always gives
        ``batch_size`` and ``device``)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # --- the cache ----------------------------------------------------------------------
    def new_cache(self) -> Cache:
        """A fresh cache for one sequence (or one generate batch): :func:`kvquant.make_cache` of the
        codebooks with the model_args' cache options, or ``DynamicCache`` without codebooks."""
        if self.kv_codebooks is None:
            return DynamicCache(config=self.model.config)
        from kvquant.cache import make_cache

        return make_cache(self.model, self.kv_codebooks, **self.kv_options)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the right-padded token rows ``inps`` (batch, seq): each row
        fed through its own fresh :meth:`new_cache` in the chunks of
        :func:`kvquant.evaluation.generation.cache_logits`, so every position reads the keys and values the
        cache returns. (Right padding follows a row's tokens: with causal attention it cannot
        change their logits.)"""
        if attn_mask is not None or labels is not None:
            raise NotImplementedError("--model kvquant evaluates decoder-only models (no encoder-decoder inputs)")
        with torch.no_grad():
            rows = [torch.cat([logits for _, logits in cache_logits(self.model, row[None], self.new_cache())])
                    for row in inps]
        return torch.stack(rows)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """lm-eval's ``model.generate`` call (greedy unless the task samples; stop sequences) with a
        fresh :meth:`new_cache` for the batch ``context`` (batch, seq; left-padded)."""
        return super()._model_generate(context, max_length, stop, **generation_kwargs, **cache_kwargs(self.new_cache()))

    def get_model_info(self) -> dict:
        """What the results JSON records about the model and its cache (no hub look-up: HFLM's asks
        the hub for the model's sha)."""
        books = self.kv_codebooks
        info = {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "kvquant_pretrained": self.kv_pretrained,
            "kvquant_cache": "DynamicCache" if books is None else "KVQuantCache",
            "kvquant_codebooks": self.kv_codebooks_path,
        }
        if books is not None:
            info.update(kvquant_method=books.config.method, kvquant_key_code_bits=books.k.mean_bits,
                        kvquant_cache_options=dict(self.kv_options))
        return info


if __name__ != "__main__":  # `python -m kvquant.evaluation.harness` registers the class of the imported module (main)
    register_model("kvquant")(KVQuantLM)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvquant.evaluation.harness ARGS``: lm-eval's command line (``lm_eval ARGS``) with the model
    type ``kvquant`` registered. ``argv``: the arguments (default ``sys.argv[1:]``). Returns 0 on
    success; 2 with one line ``kvquant.evaluation.harness: error: …`` on stderr (no traceback) for what the
    kvquant command line reports as user errors (:data:`kvquant.cli.USER_ERRORS`: bad
    ``--model_args``, missing or mismatched files, missing assets, I/O failures, NaN/inf)."""
    from lm_eval.__main__ import cli_evaluate

    from kvquant.cli import USER_ERRORS

    saved = sys.argv
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"kvquant.evaluation.harness: error: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    # importing the module registers "kvquant" (this __main__ copy of it does not)
    from kvquant.evaluation.harness import main as _main

    sys.exit(_main())
