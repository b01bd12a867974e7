"""Perplexity in generation mode: every token reads the keys and values a KV cache returns.

A full forward pass never reads a cache, so a quantized cache is judged by feeding each window
through a fresh cache and scoring every next token. Token by token that is one forward per
token; instead a window is fed in chunks cut where the cache changes how it returns tokens
already seen (:func:`chunk_starts`), which with causal attention gives every token exactly what
token-by-token decoding gives it (up to matmul rounding; tests/test_generation.py checks it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from kvquant.cache import KVQuantCache
from kvquant.evaluation.library_cache import LibraryCache
from kvquant.evaluation.perplexity import PplRow, WindowLogits, chunk_nll, score_windows
from kvquant.hf.compat import cache_kwargs
from kvquant.hf.placement import input_device
from kvquant.hf.wrap import wrapped

__all__ = ["HeldBits", "LibraryCache", "cache_factories", "cache_logits", "chunk_starts", "evaluate_generation",
           "generation_nll", "held_bits", "held_bits_curve", "kv_bits"]

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
    - transformers' ``QuantizedCache`` (residual_length R): its first update quantizes what it
      gets, and token by token the updates with tokens R, 2R, … re-quantize everything (5.24
      decides from the residual *after* the update, 5.17 from the one before): a chunk of its
      own for each of them makes both versions flush exactly there.
    - Anything else (a residual window that flushes token by token, other libraries' caches):
      every token.
    """
    if type(cache) is DynamicCache:
        return [0]
    if isinstance(cache, QuantizedCache):
        r = cache.layers[0].residual_length
        return sorted({0, 1, *range(r, n, r), *range(r + 1, n, r)})
    if isinstance(cache, KVQuantCache):
        o = cache.options
        if o.group:
            return sorted({0, *range(o.residual + o.group - 1, n, o.group)})
        if o.residual == 0:
            return [0]
    return list(range(n))


@torch.no_grad()
def cache_logits(model: torch.nn.Module, x: torch.Tensor, cache: Cache) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed one sequence ``x`` (1, n) through ``cache`` in the chunks of :func:`chunk_starts` (and
    at most :data:`MAX_CHUNK` tokens): yields ``(a, logits)``, the logits (m, vocab) at positions
    a … a+m−1, every one what token-by-token decoding through ``cache`` gives (up to rounding)."""
    n = x.shape[1]
    cuts = sorted({n, *range(0, n, MAX_CHUNK), *(p for p in chunk_starts(cache, n) if p < n)})
    for a, b in itertools.pairwise(cuts):
        yield a, model(x[:, a:b], **cache_kwargs(cache), use_cache=True).logits[0]


@torch.no_grad()
def generation_nll(model: torch.nn.Module, windows, new_cache: Callable[[], Cache], progress: bool = True,
                   desc: str = "generation") -> tuple[float, int, Cache]:
    """Σ NLL (nats, float64) and number of predicted tokens over ``windows`` (n, seqlen), each
    window fed through a fresh ``new_cache()`` (:func:`cache_logits`); also the last window's
    cache (for its memory)."""
    ids = getattr(windows, "ids", windows)
    device = input_device(model)
    total, count, cache = 0.0, 0, None
    for row in tqdm(ids, desc=desc, unit="window", disable=not progress, leave=False):
        x = row[None].to(device)
        cache = new_cache()
        for a, logits in cache_logits(model, x, cache):
            target = x[0, a + 1 : a + 1 + logits.shape[0]]
            total += chunk_nll(logits[: target.numel()], target, f"{desc} at tokens {a}–")
        count += x.shape[1] - 1
    return total, count, cache


def _storages(obj, seen: dict) -> None:
    """Collect into ``seen`` (data pointer → bytes) the storages behind ``obj``: plain tensors,
    tensor subclasses that flatten into inner tensors (optimum-quanto's QBits tensors), and
    tuples/lists/dicts of them."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            for name in obj.__tensor_flatten__()[0]:
                _storages(getattr(obj, name), seen)
        elif obj.numel():
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _storages(o, seen)
    elif isinstance(obj, dict):
        for o in obj.values():
            _storages(o, seen)


def kv_bits(cache: Cache) -> tuple[float, float]:
    """``(bits per K/V entry, bytes per token)`` of everything ``cache`` holds now (codes, scales,
    positions, exact tokens): bytes per token = Σ over layers of held bytes / (batch × held
    tokens); bits per entry = 16 × that / the bytes per token of an fp16 cache of the same model.
    :class:`KVQuantCache` counts its own tensors; any other cache is counted from the storages of
    every tensor its layers hold (quantized tensor subclasses through their inner tensors)."""
    if isinstance(cache, KVQuantCache):
        per_token, fp16 = cache.bytes_per_token(), cache.fp16_bytes_per_token()
        return (16 * per_token / fp16 if fp16 else 0.0), per_token
    per_token = fp16 = 0.0
    for lay in cache.layers:
        quantized = getattr(lay, "_quantized_keys", None)  # transformers' QuantizedLayer: codes + exact residual
        if quantized is None and (getattr(lay, "keys", None) is None or lay.keys.dim() != 4):
            continue
        t = lay.get_seq_length() if quantized is not None else lay.keys.shape[-2]  # tokens held
        if not t:
            continue
        seen: dict = {}
        _storages(list(vars(lay).values()), seen)
        b, h, _, d = (quantized if quantized is not None else lay.keys).shape
        per_token += sum(seen.values()) / (b * t)
        fp16 += 2 * 2 * h * d
    return (16 * per_token / fp16 if fp16 else 0.0), per_token


@dataclass(frozen=True)
class HeldBits:
    """K/V bits per entry a cache holds over a window of ``tokens`` tokens, after each token:
    their mean (what a user decoding through the window holds on average), the value at the end
    and the largest (:func:`held_bits`)."""

    mean: float
    end: float
    max: float
    tokens: int


def held_bits_curve(new_cache: Callable[[], Cache], model: torch.nn.Module, n: int) -> list[float]:
    """The bits per K/V entry (:func:`kv_bits`) a fresh ``new_cache()`` holds after each of ``n``
    tokens, t = 1 … n.

    What a cache holds depends on how many tokens it holds, not on their values (codes, group
    scales, exact sinks and tail, expired window tokens; evaluation stores no positions), so it is
    replayed shape only: one synthetic token (the model's KV heads, head_dim and dtype) appended
    to every layer at a time, storage only (:meth:`kvquant.cache.KVQuantLayer.store`; other caches'
    ``update``). ``DynamicCache`` holds every token alike: its bits are the same after each."""
    cache = new_cache()
    if type(cache) is DynamicCache:
        return [float(torch.finfo(model.dtype).bits)] * n
    cfg = model.config.get_text_config(decoder=True)
    h = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    device = input_device(model)
    k = torch.zeros(1, h, 1, d, dtype=model.dtype, device=device)
    curve = []
    for t in range(n):
        pos = torch.full((1, 1, 1), t, dtype=torch.int32, device=device)
        for layer in cache.layers:
            if hasattr(layer, "store"):
                layer.store(k, k, pos)
            elif hasattr(layer, "update"):
                layer.update(k, k)
        curve.append(kv_bits(cache)[0])
    return curve


def held_bits(new_cache: Callable[[], Cache], model: torch.nn.Module, n: int) -> HeldBits:
    """Mean, end and largest of :func:`held_bits_curve` over ``n`` tokens."""
    curve = held_bits_curve(new_cache, model, n)
    return HeldBits(sum(curve) / n, curve[-1], max(curve), n)


def evaluate_generation(model: torch.nn.Module, windows, caches: dict[str, Callable[[], Cache]],
                        progress: bool = True, queries: dict | None = None) -> dict[str, PplRow]:
    """Generation-mode perplexity of every row (a factory of fresh caches) on the same windows,
    with the KL divergence from the ``fp`` row and top-token agreement when there is one
    (:func:`kvquant.evaluation.perplexity.score_windows`). ``effective_bits`` is the mean K/V bits per entry
    the row's cache holds over a window, after each token (:func:`held_bits`), beside the value
    at the window's end and the largest (``kv_bits_end``, ``kv_bits_max``);
    ``kv_bytes_per_token`` is the bytes per token the last window's cache held at its end.
    ``queries``: per row name, a query quantizer (:func:`kvquant.query_quantizer`) the model is
    wrapped with while that row runs — its queries quantized beside its cache."""
    last: dict[str, Cache] = {}

    def run(name: str, new: Callable[[], Cache]) -> WindowLogits:
        def logits(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
            last[name] = new()
            quant = (queries or {}).get(name)
            if quant is None:
                yield from cache_logits(model, x, last[name])
                return
            with wrapped(model, quant):
                yield from cache_logits(model, x, last[name])

        return logits

    scores = score_windows(model, windows, {name: run(name, new) for name, new in caches.items()}, progress=progress)
    out, held_of = {}, {}
    n = int(getattr(windows, "ids", windows).shape[1])
    for name, s in scores.items():
        _, per_token = kv_bits(last[name])
        if caches[name] not in held_of:  # rows that share a factory (queries quantized beside it) hold alike
            held_of[caches[name]] = held_bits(caches[name], model, n)
        held = held_of[caches[name]]
        out[name] = s.row(name, held.mean, kv_bytes_per_token=per_token, kv_bits_end=held.end, kv_bits_max=held.max)
    return out


def cache_factories(model: torch.nn.Module, rows: dict, bits_v: int = 0, values: str | None = None,
                    tail: str = "int8") -> dict:
    """A factory of fresh caches per row of :func:`kvquant.evaluation.perplexity.make_rows` (generation mode):
    ``None`` (fp) transformers' ``DynamicCache``; :class:`LibraryCache` its ``QuantizedCache``;
    codebooks a :class:`KVQuantCache` with values at the row's ``/V`` bits
    (:func:`kvquant.evaluation.perplexity.row_value_bits`), else ``bits_v``, else the codebooks'
    ``config.bits_v`` (0 everywhere: exact values), normalised per token by ``values``
    (:data:`kvquant.cache.VALUE_NORMS`; None: make_cache's default), the newest incomplete group held
    as ``tail`` (:data:`kvquant.cache.TAIL_FORMATS`) — but for ``kivi@B`` rows exact, and values
    ``minmax``, as KIVI holds them."""
    from kvquant.cache import make_cache
    from kvquant.evaluation.perplexity import row_value_bits

    if any(isinstance(row, LibraryCache) for row in rows.values()):
        from kvquant.hf.compat import cache_layer_types

        kinds = {kind for kind, _ in cache_layer_types(model.config.get_text_config(decoder=True))}
        if kinds - {"full_attention"}:  # transformers refuses it at the row's first window, after the others ran
            names = ", ".join(n for n, r in rows.items() if isinstance(r, LibraryCache))
            raise ValueError(f"rows {names}: transformers' QuantizedCache holds full-attention layers only, this model "
                             f"also has {', '.join(sorted(kinds - {'full_attention'}))} layers; drop those rows")

    def factory(name, row):
        if row is None:
            return lambda: DynamicCache(config=model.config)
        if isinstance(row, LibraryCache):
            return lambda: row.new(model)
        bv = row_value_bits(name) or bits_v or row.config.bits_v
        kivi = name.split("@")[0] == "kivi"
        held, norm = ("exact", "minmax") if kivi else (tail, values)
        return lambda: make_cache(model, row, quantize_values=bv > 0, bits_v=bv or None, values=norm, tail=held)

    return {name: factory(name, row) for name, row in rows.items()}
