"""``kvquant generate``: a greedy continuation through kvquant's quantized KV cache."""

from __future__ import annotations

import sys

import torch

import kvquant
from kvquant.cli.options import (
    load_model_of,
    resolve_options,
    trained_context,
)


def cmd_generate(args) -> None:
    from kvquant.cache import make_cache
    from kvquant.codebooks import Codebooks
    from kvquant.evaluation.generation import kv_bits
    from kvquant.hf.compat import cache_kwargs

    resolve_options(args, ["model", "dtype", "device"])
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.bits_v == 0:
        raise ValueError("--bits-v 0: the cached values are quantized at 1..8 bits; leave --bits-v out for the "
                         "codebooks' own value bits")
    if args.prefill == "int8" and args.device != "cpu":
        raise ValueError(f"--prefill int8 runs on the CPU (a C kernel), not on --device {args.device}; use --prefill sdpa")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as surrogate escapes
        raise ValueError("--prompt is not valid UTF-8 text: pass the prompt as UTF-8") from None
    books = Codebooks.load(args.codebooks)
    model, tok = load_model_of(args)
    books.check_fits(model)
    cache = make_cache(model, books, bits_v=args.bits_v, values=args.values)
    kvquant.wrap(model, prefill=args.prefill)  # after make_cache, which wraps the model for its decoding steps
    enc = tok(args.prompt, return_tensors="pt").to(args.device)
    if enc.input_ids.shape[1] == 0:
        raise ValueError("--prompt is empty after tokenization")
    trained, held = trained_context(model), enc.input_ids.shape[1]
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
          f"tokens quantized (the sink exact; the newest incomplete group of up to {(books.k.group or 1) - 1} tokens "
          f"{'as INT8 per token' if cache.options.tail == 'int8' else 'exact'} until it completes)",
          file=sys.stderr)
