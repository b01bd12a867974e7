"""Pre-RoPE quantization: derotate/rotate, the attention function's pre frame, calibration and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ, make_model, random_ids

import kvquant
from kvquant.hf.calibrate import CalibrationConfig, calibrate, capture
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.hf.compat import cache_kwargs
from kvquant.core.rope import derotate, rotate
from kvquant.hf.wrap import attention_modules

ROTARY = ("llama", "qwen2", "mistral", "gemma3", "gptneox")


class PreQuantizer:
    """Records what it sees; ``f`` applied to it (identity by default)."""

    rope = "pre"

    def __init__(self, f=lambda x: x):
        self.f, self.seen = f, []

    def __call__(self, x, layer, side):
        self.seen.append((layer, side, x.clone()))
        return self.f(x)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


def _tables(t=SEQ, r=16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(r // 2, generator=g) * 2
    ang = torch.arange(t)[:, None] * theta[None]
    ang = torch.cat([ang, ang], -1)[None]
    return ang.cos() * scale, ang.sin() * scale


@pytest.mark.parametrize("r,scale", [(16, 1.0), (8, 1.0), (16, 1.3)])
def test_derotate_inverts_rotate(r, scale):
    x = torch.randn(2, 3, SEQ, 16)
    cos, sin = _tables(r=r, scale=scale)
    torch.testing.assert_close(derotate(rotate(x, cos, sin), cos, sin), x, rtol=1e-5, atol=1e-5)
    y = rotate(x, cos, sin)
    assert not torch.allclose(y[..., :r], x[..., :r])  # it really rotates …
    assert torch.equal(y[..., r:], x[..., r:])  # … and passes the non-rotary dims through


def test_derotate_undoes_transformers_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, SEQ, 16), torch.randn(2, 2, SEQ, 16)
    cos, sin = _tables()
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(derotate(qr, cos, sin), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derotate(kr, cos, sin), k, rtol=1e-5, atol=1e-5)


def test_rotary_table_shape_is_checked():
    cos, sin = _tables(t=SEQ - 1)
    with pytest.raises(ValueError, match="positions"):
        derotate(torch.randn(1, 2, SEQ, 16), cos, sin)


@pytest.mark.parametrize("family", ROTARY)
def test_pre_frame_identity_keeps_logits_and_sees_unrotated_entries(family):
    model = make_model(family)
    ids = random_ids(2, SEQ)
    ref = logits(model, ids)
    quant = PreQuantizer()
    with kvquant.wrapped(model, quant):
        out = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    post = []  # post-RoPE entries, for comparison
    with kvquant.wrapped(model, lambda x, layer, side: post.append(x.clone()) or x):
        logits(model, ids)
    # pre-RoPE entries differ from post-RoPE ones except at position 0 (rotation by angle 0)
    q_pre, q_post = quant.seen[0][2], post[0]
    torch.testing.assert_close(q_pre[:, :, 0], q_post[:, :, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q_pre[:, :, 1:], q_post[:, :, 1:], atol=1e-3)


def test_pre_frame_equals_quantizing_before_the_rotation_by_hand(monkeypatch):
    """Pre-RoPE quantization = f applied to RoPE's inputs (checked by patching transformers'
    own ``apply_rotary_pos_emb`` in the unwrapped model)."""
    import transformers.models.llama.modeling_llama as ml

    model = make_model("llama")

    def f(x):  # smooth (a rounding step would flip on the rotation round trip's last bit) and not rotation-equivariant
        return x + 0.1 * x**3

    ids = random_ids(2, SEQ)
    with kvquant.wrapped(model, PreQuantizer(f)):
        out = logits(model, ids)
    with kvquant.wrapped(model, lambda x, layer, side: f(x)):
        post = logits(model, ids)
    orig = ml.apply_rotary_pos_emb
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: orig(f(q), f(k), cos, sin, *a, **kw))
    ref = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (post - ref).abs().max() > 1e-3  # the frame matters


def test_pre_frame_refuses_models_without_rotary():
    model = make_model("gpt2")
    with kvquant.wrapped(model, PreQuantizer()), pytest.raises(ValueError, match="rotary"):
        logits(model, random_ids(1, SEQ))


def test_pre_frame_refuses_cached_keys():
    model = make_model("llama")
    ids = random_ids(1, SEQ)
    with kvquant.wrapped(model, PreQuantizer()), torch.no_grad():
        out = model(ids, use_cache=True)  # the prefill itself is fine: keys = queries' positions
        with pytest.raises(NotImplementedError, match="cache"):
            model(ids[:, :1], **cache_kwargs(out.past_key_values), use_cache=True)


def test_unwrap_removes_the_rotary_hook():
    model = make_model("llama")
    ids = random_ids(1, SEQ)
    with kvquant.wrapped(model, PreQuantizer()):
        logits(model, ids)
    mods = attention_modules(model)
    assert mods and all(not m._forward_pre_hooks and not hasattr(m, "kvquant_rotary") for m in mods)


def test_calibration_in_the_pre_frame(tmp_path):
    model = make_model("llama")
    ids = random_ids(2, SEQ)
    post, _ = capture(model, ids, progress=False)
    pre, _ = capture(model, ids, progress=False, rope="pre")
    assert not torch.allclose(post.head_moments().rho, pre.head_moments().rho)
    # σ² summed over a rotated channel pair is rotation-invariant: per-head second moments agree
    torch.testing.assert_close(pre.head_moments().sigma_q, post.head_moments().sigma_q, rtol=0.2, atol=0)

    config = CodebookConfig("lambda", 3, 3, "channel-group", 4, 1, rope="pre")
    books = calibrate(model, ids, CalibrationConfig(config), progress=False)
    assert books.rope == "pre"
    ref = logits(model, ids)
    with kvquant.wrapped(model, books):
        out = logits(model, ids)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
    path = tmp_path / "pre.safetensors"
    books.save(path)
    assert Codebooks.load(path).config.rope == "pre"
    with pytest.raises(ValueError, match="RoPE"):
        books.rebuilt(rope="post")
    books.rebuilt(bits_q=2)  # same frame: fine
    assert kvquant.make_cache(model, books).layers[0].rope is not None  # the cache stores them pre-RoPE
    with pytest.raises(ValueError, match="causal_queries"):
        kvquant.query_quantizer(books, model)  # group-normalised queries would look ahead


@pytest.mark.parametrize("norm", ["channel-token", "channel"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_causal_queries_beside_the_prerope_cache_equal_the_simulated_path(family, norm):
    """Pre-RoPE keys in the cache and queries through static per-channel tables, with or without
    a per-token scale (``causal_queries``), fed as decoding feeds them (chunks of ``chunk_starts``, equal to token
    by token): the logits of the simulated forward with the same query and key books, whose
    attention reads each key quantized only once its group is complete (block-causal)."""
    import itertools
    from dataclasses import replace

    from kvquant.hf.compat import cache_kwargs
    from kvquant.evaluation.generation import chunk_starts

    model = make_model(family)
    ids = random_ids(2, SEQ)
    config = CodebookConfig("lambda", 3, 3, "channel-group", 4, 1, rope="pre", scale_bits=8)
    books = calibrate(model, ids, CalibrationConfig(config), progress=False)
    qbooks = books.causal_queries(norm=norm)
    assert qbooks.q.group == 0 and qbooks.config.norm == norm and qbooks.q.sink == 1
    assert qbooks.q.token_scale == (norm == "channel-token")
    with kvquant.wrapped(model, replace(books, q=qbooks.q)):  # simulated: static queries, group keys
        ref = logits(model, ids)
    cache = kvquant.make_cache(model, books, quantize_values=False, tail="exact")  # the simulated path's rule
    cuts = [*chunk_starts(cache, SEQ), SEQ]
    with kvquant.wrapped(model, kvquant.query_quantizer(qbooks, model)), torch.no_grad():
        got = torch.cat([model(ids[:, a:b], **cache_kwargs(cache), use_cache=True).logits.float()
                         for a, b in itertools.pairwise(cuts)], dim=1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_config_validates_rope():
    with pytest.raises(ValueError, match="rope"):
        CodebookConfig(rope="middle")

