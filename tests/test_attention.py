"""kvquant's attention function: off / capture / quantize modes on every tiny model family."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EXPECTED_WINDOWS,
    FAMILIES,
    GQA_FAMILIES,
    SEQ,
    WINDOW,
    left_padded,
    make_model,
    random_ids,
)

import kvquant
from kvquant.hf.attention import (
    ATTN_NAME,
    Controller,
    kvquant_attention,
    pair_mask,
    register,
)
from kvquant.hf.wrap import controller


@torch.no_grad()
def logits(model, ids, mask=None):
    return model(ids, attention_mask=mask, use_cache=False).logits


def expected_pairs(window, attention_mask_2d, b, t_len=SEQ):
    """Independent (T, S) bool pattern of allowed pairs for batch row ``b``."""
    t = torch.arange(t_len)[:, None]
    s = torch.arange(t_len)[None, :]
    allowed = s <= t
    if window is not None:
        allowed &= s > t - window
    if attention_mask_2d is not None:
        real = attention_mask_2d[b].bool()
        allowed &= real[None, :] & real[:, None]
    return allowed


class Recorder:
    """Observer that keeps what capture mode hands over."""

    def __init__(self):
        self.calls = []

    def __call__(self, layer, q, k, mask):
        self.calls.append((layer, q.clone(), k.clone(), mask.clone()))


def capture_calls(model, ids, mask=None) -> tuple[Recorder, torch.Tensor]:
    """Run ``model`` wrapped in capture mode; what the observer received, and the logits."""
    rec = Recorder()
    with kvquant.wrapped(model):
        ctl = controller(model)
        ctl.observer = rec
        ctl.set_mode("capture")
        out = logits(model, ids, mask)
    return rec, out


# --- off mode --------------------------------------------------------------------------------


def test_off_mode_identical_logits(tiny_model):
    ids = random_ids(2, SEQ)
    ref = logits(tiny_model, ids)
    kvquant.wrap(tiny_model)
    ctl = controller(tiny_model)
    assert ctl.mode == "off" and tiny_model.config._attn_implementation == ATTN_NAME
    out = logits(tiny_model, ids)
    assert ctl.calls == {0, 1}, "every layer must run through kvquant's function"
    assert torch.equal(out, ref)


def test_off_mode_identical_logits_with_left_padding(tiny_model):
    ids, mask = left_padded()
    ref = logits(tiny_model, ids, mask)
    no_mask_ref = logits(tiny_model, ids)
    with kvquant.wrapped(tiny_model):
        out = logits(tiny_model, ids, mask)
        out_no_mask = logits(tiny_model, ids)
    assert torch.equal(out, ref)
    assert torch.equal(out_no_mask, no_mask_ref)
    # The mask really reaches the function: on the padded row's real tokens the result differs
    # from running the same ids without the mask (a lost mask would make both equal).
    assert (out[1, 3:] - out_no_mask[1, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(out[0], out_no_mask[0], atol=1e-6, rtol=0)  # the unpadded row does not care (another SDPA call)
    assert torch.isfinite(out[1, 3:]).all()


@pytest.mark.parametrize("family", [f for f in FAMILIES if any(EXPECTED_WINDOWS[f])])
def test_sliding_window_reaches_function(family):
    """With the window (4) smaller than the sequence (12), the pair mask the function receives
    is the windowed pattern on sliding layers and the causal one elsewhere."""
    model = make_model(family)
    rec, _ = capture_calls(model, random_ids(1, SEQ))
    assert [c[0] for c in rec.calls] == [0, 1]
    for layer, _, _, mask in rec.calls:
        want = expected_pairs(EXPECTED_WINDOWS[family][layer], None, 0)
        assert torch.equal(mask[0, 0], want), f"layer {layer}"
    assert any(int(c[3].sum()) < SEQ * (SEQ + 1) // 2 for c in rec.calls)


def test_capture_mask_excludes_padding(family):
    model = make_model(family)
    ids, am = left_padded(pads=(0, 3))
    rec, out = capture_calls(model, ids, am)
    ref = logits(model, ids, am)
    assert torch.equal(out, ref), "capture mode must not change the result"
    for layer, q, k, mask in rec.calls:
        assert mask.dtype == torch.bool and mask.shape == (2, 1, SEQ, SEQ)
        for b in range(2):
            assert torch.equal(mask[b, 0], expected_pairs(EXPECTED_WINDOWS[family][layer], am, b)), (layer, b)


# --- quantize mode ---------------------------------------------------------------------------


class RecordingQuantizer:
    """Returns its input (optionally perturbed on one side) and records what it was given."""

    def __init__(self, perturb: str | None = None):
        self.perturb = perturb
        self.seen = []

    def __call__(self, x, layer, side):
        self.seen.append((layer, side, tuple(x.shape), x.clone()))
        if side == self.perturb:
            return x + 0.25 * torch.sign(x)
        return x


def _heads(model):
    cfg = model.config
    h = cfg.num_attention_heads
    return h, getattr(cfg, "num_key_value_heads", None) or h


def test_quantize_identity_quantizer_matches_off_and_sees_only_q_and_k(tiny_model):
    ids = random_ids(2, SEQ)
    ref = logits(tiny_model, ids)
    # post-RoPE q/k as capture mode sees them, to compare with what the quantizer receives
    rec, _ = capture_calls(tiny_model, ids)
    quant = RecordingQuantizer()
    with kvquant.wrapped(tiny_model, quant):
        assert controller(tiny_model).mode == "quantize"
        out = logits(tiny_model, ids)
    assert torch.equal(out, ref)

    h, h_kv = _heads(tiny_model)
    d = 16
    assert [(layer, side) for layer, side, _, _ in quant.seen] == [(0, "q"), (0, "k"), (1, "q"), (1, "k")]
    for (layer, side, shape, x), (_, q, k, _) in zip(quant.seen, [c for c in rec.calls for _ in (0, 1)]):
        if side == "q":
            assert shape == (2, h, SEQ, d)
            assert torch.equal(x, q)
        else:
            assert shape == (2, h_kv, SEQ, d)
            assert torch.equal(x, k)  # the (unrepeated) keys, not the values


@pytest.mark.parametrize("side", ["q", "k"])
def test_quantize_perturbing_one_side_changes_logits(family, side):
    model = make_model(family)
    ids = random_ids(2, SEQ)
    ref = logits(model, ids)
    with kvquant.wrapped(model, RecordingQuantizer(perturb=side)):
        out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3


def test_quantize_mode_equals_hand_patched_rope(monkeypatch, llama):
    """Quantize mode = SDPA attention on f(q), f(k) where q, k are RoPE's outputs (checked by
    patching transformers' own ``apply_rotary_pos_emb`` in the unwrapped model)."""
    import transformers.models.llama.modeling_llama as ml

    def f(x, layer=None, side=None):
        return torch.round(x * 4) / 4

    ids = random_ids(2, SEQ)
    plain = logits(llama, ids)
    with kvquant.wrapped(llama, f):
        out = logits(llama, ids)
    assert not torch.equal(out, plain)
    orig = ml.apply_rotary_pos_emb
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", lambda *a, **kw: tuple(f(t) for t in orig(*a, **kw)))
    ref = logits(llama, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_quantize_with_padding_is_finite(family):
    model = make_model(family)
    ids, am = left_padded()
    with kvquant.wrapped(model, lambda x, layer, side: torch.round(x * 2) / 2):
        out = logits(model, ids, am)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 3:]).all()


# --- pieces ----------------------------------------------------------------------------------


def test_controller_validates_modes():
    ctl = Controller()
    with pytest.raises(ValueError, match="mode must be"):
        ctl.set_mode("train")
    with pytest.raises(ValueError, match="quantizer"):
        ctl.set_mode("quantize")
    with pytest.raises(ValueError, match="observer"):
        ctl.set_mode("capture")
    ctl.quantizer = lambda x, layer, side: x
    ctl.set_mode("quantize")
    assert ctl.mode == "quantize"


def test_pair_mask_without_materialised_mask():
    causal = pair_mask(None, 3, 5, True, "cpu")
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal[0, 0], want)  # aligned so the last query sees every key
    assert pair_mask(None, 1, 4, True, "cpu").all()
    assert pair_mask(None, 3, 3, False, "cpu").all()
    m = torch.rand(2, 1, 3, 3) > 0.5
    assert pair_mask(m, 3, 3, True, "cpu") is m
    with pytest.raises(TypeError, match="boolean"):
        pair_mask(torch.zeros(1, 1, 3, 3), 3, 3, True, "cpu")


def test_selecting_kvquant_by_hand_without_wrap_is_refused(llama):
    register()
    llama.set_attn_implementation(ATTN_NAME)
    with pytest.raises(RuntimeError, match="not wrapped"):
        logits(llama, random_ids(1, 4))


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_keys_are_not_repeated(family):
    model = make_model(family)
    rec, _ = capture_calls(model, random_ids(1, SEQ))
    for _, q, k, _ in rec.calls:
        assert q.shape[1] == 4 and k.shape[1] == 2


def test_kvquant_attention_direct_call_matches_sdpa():
    """Calling the function by hand with GQA shapes and a window mask gives SDPA's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mod = torch.nn.Module()
    mod.layer_idx, mod.is_causal, mod.num_key_value_groups = 0, True, 2
    mod.kvquant = Controller()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 6, 8, generator=g) for h in (4, 2, 2))
    mask = expected_pairs(WINDOW, None, 0, 6)[None, None]
    out, _ = kvquant_attention(mod, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)
    assert torch.equal(out, ref)
    assert mod.kvquant.calls == {0}
