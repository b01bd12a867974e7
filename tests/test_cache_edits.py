"""Removing or reordering tokens in a KVQuantCache (crop, reorder_cache, batch_select_indices)
keeps exactly what the cache held, at every offset: inside a group, at group ends, into the sink.

* With past recording on (``activate_past_recording``, which assisted decoding calls), a crop
  inside the last update puts the layer back as it was before that update and appends the kept
  tokens again from their exact copies: it then equals a layer fed only the kept tokens (keys,
  values, positions, memory), at every offset.
* Any other crop keeps the first ``T − c`` keys and values the layer served, bit for bit
  (pre-RoPE keys rotated at their own positions); the next token's logits equal those of a
  ``DynamicCache`` holding exactly those. Where it splits no quantized group, the layer also
  equals one fed the kept tokens. Where it splits a group completed earlier, the kept part is
  held as served: its exact originals are gone, so nothing can match a fresh layer there.
* Reordering or selecting batch rows equals a fresh cache fed those rows.
* Assisted generation (``generate(..., assistant_model=...)``) crops the rejected drafts: the
  cache it leaves equals one fed the accepted tokens.

Group 8 (a multiple of 8, so decoding steps read the codes through the C kernel), one sink.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_ids
from transformers import DynamicCache

import kvquant
from kvquant.cache import make_cache
from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig
from kvquant.hf.compat import cache_kwargs

G = 8
T = 2 * G + 5  # two complete groups and 5 exact tokens
CONFIGS = {
    "group-pre-rope": dict(norm="channel-group", group=G, sink=1, scale_bits=8, rope="pre"),
    "group-post-rope": dict(norm="channel-group", group=G, sink=1),
    "static-channel": dict(norm="channel"),
    "group-pre-rope-int8-tail": dict(norm="channel-group", group=G, sink=1, scale_bits=8, rope="pre", tail="int8"),
}


def _books(model, config: str):
    book = {k: v for k, v in CONFIGS[config].items() if k != "tail"}
    cfg = CalibrationConfig(CodebookConfig("lambda", 4, 4, **book))
    return calibrate(model, random_ids(2, 24, seed=7), cfg, progress=False)


def _cache(model, books, config: str):
    """A fresh cache of ``books`` with the residual's format ``config`` names."""
    return make_cache(model, books, tail=CONFIGS[config].get("tail", "exact"))


def _served(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [layer._materialize() for layer in cache.layers]


@torch.no_grad()
def _prefilled(model, books, ids, config: str, record: bool = False):
    cache = _cache(model, books, config)
    if record:
        cache.activate_past_recording()
    model(ids, **cache_kwargs(cache), use_cache=True)
    return cache


@torch.no_grad()
def _next_logits(model, cache, token: torch.Tensor) -> torch.Tensor:
    return model(token, **cache_kwargs(cache), use_cache=True).logits


class _AsHeld(DynamicCache):
    """A DynamicCache whose new keys and values are held as ``like``'s residual holds a new token's
    (exact, or the INT8 round trip)."""

    def __init__(self, model, like):
        super().__init__(config=model.config)
        self.like = like

    def update(self, k, v, i, *args, **kwargs):
        lay = self.like.layers[i]
        k, v = lay._decode_tail(*lay._encode_tail(k)), lay._decode_tail(*lay._encode_tail(v))
        return super().update(k, v, i, *args, **kwargs)


def _dynamic_with(model, served: list[tuple[torch.Tensor, torch.Tensor]], like) -> DynamicCache:
    """A cache holding ``served`` as given, whose next keys and values are held as ``like`` holds them."""
    ref = _AsHeld(model, like)
    for i, (k, v) in enumerate(served):
        DynamicCache.update(ref, k, v, i)
    return ref


CHUNKS = (T - 3, 3)  # two updates: a crop of up to 3 tokens stays inside the last one


def _feed(layer, k: torch.Tensor, v: torch.Tensor, chunks) -> None:
    """Update ``layer`` with keys/values (B, H, n, D) in ``chunks``, at stream positions."""
    at = 0
    for n in chunks:
        if layer.rope is not None:
            layer.rope.module.kvquant_positions = torch.arange(at, at + n)[None]
        layer.update(k[:, :, at:at + n], v[:, :, at:at + n])
        at += n


def _same_state(a, b) -> bool:
    (k1, v1), (k2, v2) = a._materialize(), b._materialize()
    same = a.held_tokens == b.held_tokens and torch.equal(k1, k2) and torch.equal(v1, v2)
    if a.rope is not None and a.quantized_tokens:
        same = same and torch.equal(a._quantized_positions(), b._quantized_positions())
    return same and a.memory_bytes() == b.memory_bytes()


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_crop_at_every_offset(family, config, record):
    """Layer by layer (gemma3: layer 0 slides, window 4), keys and values fed directly. With past
    recording (what assisted decoding turns on), a crop inside the last update leaves the layer
    equal to one fed only the kept tokens; any other crop keeps what was served (an INT8 tail holds
    a split group's kept part as INT8 again: within half a step of what was served)."""
    model = make_model(family)
    books = _books(model, config)
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(2, 2, T, 16, generator=g) * 2 + 0.5, torch.randn(2, 2, T, 16, generator=g)
    for i in range(2):
        sliding = getattr(_cache(model, books, config).layers[i], "sliding_window", None)
        if sliding and not record:
            continue  # beyond its window a sliding layer crops only with past recording, as in transformers
        for removed in range(1, T):
            kept = T - removed
            layer = _cache(model, books, config).layers[i]
            if record:
                layer.activate_past_recording()
            _feed(layer, k, v, CHUNKS)
            before = layer._materialize()
            layer.crop(-removed)
            assert layer.get_seq_length() == kept
            fresh = _cache(model, books, config).layers[i]
            if record:
                fresh.activate_past_recording()
            _feed(fresh, k, v, [CHUNKS[0], kept - CHUNKS[0]] if kept > CHUNKS[0] else [kept])
            fresh.crop(0)  # a sliding layer: back to its window, as crop leaves it
            splits = books.k.group and kept % G and kept < T // G * G
            if record and removed <= CHUNKS[1]:
                assert _same_state(layer, fresh), (i, removed)
                continue
            k1, v1 = layer._materialize()
            n = layer.held_tokens
            if splits and CONFIGS[config].get("tail") == "int8":  # the split group held as INT8 again
                for got, was in ((k1, before[0][:, :, kept - n:kept]), (v1, before[1][:, :, kept - n:kept])):
                    assert ((got - was).abs() <= was.abs().amax(-1, keepdim=True) / 127 * 0.51).all()
            else:
                assert torch.equal(k1, before[0][:, :, kept - n:kept]) and torch.equal(v1, before[1][:, :, kept - n:kept])
            if not splits:
                assert _same_state(layer, fresh), (i, removed)


@pytest.mark.parametrize("config", ["group-pre-rope", "group-post-rope", "group-pre-rope-int8-tail"])
def test_logits_after_a_crop_into_a_group(config):
    """Through the model: after a crop of a prefill (no recording), the next token's logits equal
    those of a DynamicCache holding exactly the keys and values the cache serves for the kept
    tokens (those it served before the crop, but for an INT8 tail's split group:
    test_crop_at_every_offset) and the next token's as the residual holds it (one that completes
    a group is quantized)."""
    model = make_model("llama")
    books = _books(model, config)
    ids = random_ids(2, T + 1, seed=3)
    for removed in range(1, T):
        kept = T - removed
        if (kept + 1) % G == 0:
            continue
        cache = _prefilled(model, books, ids[:, :T], config)
        cache.crop(-removed)
        want = _next_logits(model, _dynamic_with(model, _served(cache), cache), ids[:, kept:kept + 1])
        torch.testing.assert_close(_next_logits(model, cache, ids[:, kept:kept + 1]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", ["group-pre-rope", "static-channel"])
def test_reorder_and_select_rows_equal_a_fresh_cache_of_those_rows(config):
    """Layer by layer, the same keys and values fed directly (no model run on another batch shape,
    whose matmuls may round differently)."""
    model = make_model("llama")
    books = _books(model, config)
    g = torch.Generator().manual_seed(12)
    k, v = torch.randn(3, 2, T, 16, generator=g) * 2 + 0.5, torch.randn(3, 2, T, 16, generator=g)
    for op, rows in (("reorder_cache", [2, 0, 0]), ("batch_select_indices", [2, 1])):
        for i in range(2):
            layer, fresh = _cache(model, books, config).layers[i], _cache(model, books, config).layers[i]
            _feed(layer, k, v, CHUNKS)
            getattr(layer, op)(torch.tensor(rows))
            _feed(fresh, k[rows], v[rows], CHUNKS)
            assert _same_state(layer, fresh), (op, i)


@pytest.mark.parametrize("config", ["group-pre-rope", "static-channel"])
def test_assisted_generation_leaves_the_cache_of_the_accepted_tokens(config):
    """Assisted decoding feeds each verification step (the last token and the drafts) and crops
    the rejected drafts: every layer then holds what a layer fed only the accepted part of each
    step holds, bit for bit. With per-token codes (static norm) the tokens are greedy decoding's;
    with groups they may differ, since a verification step's queries read the keys of a group it
    completes quantized where one-token steps read them exact (as any chunked prefill does)."""
    model = make_model("llama")
    books = _books(model, config)
    assistant = make_model("llama", seed=1)  # a different draft model: its drafts are rejected and cropped
    prompt = random_ids(1, 6, seed=5)
    new = 3 * G
    cache = _cache(model, books, config)
    steps: list[list] = [[] for _ in cache.layers]  # per layer: [keys, values, positions, tokens cropped]

    def recording(i, layer):
        update, crop = layer.update, layer.crop

        def rec_update(k, v, *args, **kwargs):
            pos = layer.rope.module.kvquant_positions if layer.rope is not None else None
            steps[i].append([k.clone(), v.clone(), None if pos is None else pos.clone(), 0])
            return update(k, v, *args, **kwargs)

        def rec_crop(n, *args, **kwargs):
            steps[i][-1][3] -= n
            return crop(n, *args, **kwargs)

        layer.update, layer.crop = rec_update, rec_crop

    for i, layer in enumerate(cache.layers):
        recording(i, layer)
    out = model.generate(prompt, **cache_kwargs(cache), assistant_model=assistant, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False)
    assert any(step[3] > 0 for step in steps[0])  # drafts were rejected and cropped
    assert cache.get_seq_length() == out.shape[1] - 1
    accepted = _cache(model, books, config)
    for i, layer in enumerate(accepted.layers):
        for k, v, pos, cropped in steps[i]:
            n = k.shape[2] - cropped
            if layer.rope is not None:
                layer.rope.module.kvquant_positions = pos[..., :n]
            layer.update(k[:, :, :n], v[:, :, :n])
    for (k1, v1), (k2, v2) in zip(_served(cache), _served(accepted)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    if not books.k.group:
        plain = model.generate(prompt, **cache_kwargs(_cache(model, books, config)), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False)
        assert torch.equal(out, plain)
    kvquant.unwrap(model)
