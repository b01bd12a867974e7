"""Perplexity in generation mode: every token reads the keys and values a KV cache returns.

A full forward pass never reads a cache, so a quantized cache is judged by feeding each window
through a fresh cache and scoring every next token. Token by token that is one forward per
token; instead a window is fed in chunks cut where the cache changes how it returns tokens
already seen (:func:`chunk_starts`), which with causal attention gives every token exactly what
token-by-token decoding gives it (up to matmul rounding; tests/test_generation.py checks it).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache

from kvquant.cache import KVQuantCache
from kvquant.compat import cache_kwargs
from kvquant.perplexity import PplRow

__all__ = ["chunk_starts", "evaluate_generation", "generation_nll", "kv_bits"]

#: Longest chunk fed at once (bounds the logits' memory); any finer split gives the same result.
MAX_CHUNK = 256


def chunk_starts(cache: Cache, n: int) -> list[int]:
    """Where chunks of a window of ``n`` tokens must start for ``cache`` so that chunked feeding
    equals token-by-token decoding.

    - ``DynamicCache`` returns every token as given: any split.
    - :class:`KVQuantCache` with dynamic groups of G (aligned at token 0, residual r): the group
      of tokens ``[c − r − G, c − r)`` is quantized when the count reaches ``c = r + kG``, i.e.
      when token ``c − 1`` is appended, before its attention runs; a chunk must therefore start
      at each ``c − 1`` (the tokens before it saw the group exact, the ones from it on see it
      quantized). Static normalisation without a residual quantizes every token when appended:
      any split.
    - Anything else (a residual window that flushes token by token, other libraries' caches):
      every token.
    """
    if type(cache) is DynamicCache:
        return [0]
    if isinstance(cache, KVQuantCache):
        o = cache.options
        if o.group:
            return sorted({0, *range(o.residual + o.group - 1, n, o.group)})
        if o.residual == 0:
            return [0]
    return list(range(n))


@torch.no_grad()
def generation_nll(model: torch.nn.Module, windows, new_cache: Callable[[], Cache], progress: bool = True,
                   desc: str = "generation") -> tuple[float, int, Cache]:
    """Σ NLL (nats, float64) and number of predicted tokens over ``windows`` (n, seqlen), each
    window fed through a fresh ``new_cache()`` in the chunks of :func:`chunk_starts`; also the last
    window's cache (for its memory)."""
    ids = getattr(windows, "ids", windows)
    device = next(model.parameters()).device
    total, count, cache = 0.0, 0, None
    for row in tqdm(ids, desc=desc, unit="window", disable=not progress, leave=False):
        x = row[None].to(device)
        n = x.shape[1]
        cache = new_cache()
        cuts = sorted({n, *range(0, n, MAX_CHUNK), *(p for p in chunk_starts(cache, n) if p < n)})
        for a, b in itertools.pairwise(cuts):
            logits = model(x[:, a:b], **cache_kwargs(cache), use_cache=True).logits[0].float()
            target = x[0, a + 1 : b + 1]
            nll = F.cross_entropy(logits[: target.numel()], target, reduction="sum")
            if not math.isfinite(float(nll)):
                raise FloatingPointError(f"non-finite NLL in {desc} at tokens {a}–{b}: the cache returned NaN/inf")
            total += float(nll.double())
        count += n - 1
    return total, count, cache


def kv_bits(cache: Cache) -> tuple[float, float]:
    """``(bits per K/V entry, bytes per token)`` of everything ``cache`` holds now (codes, scales,
    positions, exact tokens): bytes per token = Σ over layers of held bytes / (batch × held
    tokens); bits per entry = 16 × that / the bytes per token of an fp16 cache of the same model."""
    if isinstance(cache, KVQuantCache):
        per_token, fp16 = cache.bytes_per_token(), cache.fp16_bytes_per_token()
    else:
        per_token = fp16 = 0.0
        for lay in cache.layers:
            if getattr(lay, "keys", None) is None or lay.keys.numel() == 0:
                continue
            b, _, t, _ = lay.keys.shape
            per_token += (lay.keys.nbytes + lay.values.nbytes) / (b * t)
            fp16 += 2 * (lay.keys.numel() + lay.values.numel()) / (b * t)
    return (16 * per_token / fp16 if fp16 else 0.0), per_token


def evaluate_generation(model: torch.nn.Module, windows, caches: dict[str, Callable[[], Cache]],
                        progress: bool = True) -> dict[str, PplRow]:
    """Generation-mode perplexity of every row (a factory of fresh caches) on the same windows;
    ``effective_bits`` is the K/V bits per entry the last window's cache held at its end
    (:func:`kv_bits`), ``kv_bytes_per_token`` its bytes per token."""
    out: dict[str, PplRow] = {}
    for name, new in tqdm(caches.items(), desc="rows", unit="row", disable=not progress):
        t0 = time.perf_counter()
        total, count, cache = generation_nll(model, windows, new, progress, desc=name)
        bits, per_token = kv_bits(cache)
        out[name] = PplRow(name, math.exp(total / count), total / count, count, bits, time.perf_counter() - t0,
                           kv_bytes_per_token=per_token)
    return out
