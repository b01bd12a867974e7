"""Per-head attention-logit error (kvquant.evaluation.diagnostics.logit_errors): post- and pre-RoPE quantizers,
queries exact and block-causal keys (the deployed KV cache's quantizer), against references
computed here from captured q and k and transformers' own rotary embedding."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ, make_model, random_ids, tiny_books
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvquant.evaluation.baselines import Baseline
from kvquant.hf.calibrate import run_capture
from kvquant.evaluation.diagnostics import KeysOnly, QueryKeyPair, logit_errors

ROTARY = ("llama", "gemma3", "gptneox")  # full rotary + q/k norms and sliding windows, partial rotary


class Fn:
    """Quantizer ``f(x, layer, side)`` in the frame ``rope``."""

    def __init__(self, f, rope="post"):
        self.f, self.rope = f, rope

    def __call__(self, x, layer, side):
        return self.f(x, layer, side)


def identity(x, layer, side):
    return x


def scale(x, layer, side):  # commutes with any rotation: the error is |c_q·c_k − 1| in every head
    return x * ((1.1 + 0.05 * layer) if side == "q" else 0.9)


def rounding(x, layer, side):  # does not commute with the rotation
    return torch.round(x * 2) / 2


def captured(model, ids, rope):
    """{layer: (q, k, mask)} in the ``rope`` frame, the windows (one forward each) along the batch."""
    seen = {}
    run_capture(model, ids, lambda layer, q, k, m: seen.setdefault(layer, []).append((q, k, m.expand(len(q), -1, -1, -1))),
                progress=False, rope=rope)
    return {layer: tuple(torch.cat(x) for x in zip(*calls)) for layer, calls in seen.items()}


def reference(model, ids, quantize, keys_only=False, group=0):
    """Relative logit error (L, H) of a pre-RoPE quantizer, computed here: q and k captured before
    the rotary embedding, ``quantize(x, layer, side)``, rotated with transformers' Llama RoPE and the
    model's rotary module, against the post-RoPE logits; block-causal keys for ``group`` > 0."""
    pre, post = captured(model, ids, "pre"), captured(model, ids, "post")
    t = ids.shape[1]
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(t)[None])
    tt, ss = torch.arange(t)[:, None], torch.arange(t)[None, :]
    read_q = (ss // group + 1) * group <= tt + 1 if group else torch.ones(t, t, dtype=torch.bool)
    errs = []
    for layer in sorted(pre):
        q, k, m = pre[layer]
        qp, kp, _ = post[layer]
        q_hat = q if keys_only else quantize(q, layer, "q")
        q_rot, k_rot = apply_rotary_pos_emb(q_hat, quantize(k, layer, "k"), cos, sin)
        q_rot = qp if keys_only else q_rot
        g = q.shape[1] // k.shape[1]
        s = qp @ kp.repeat_interleave(g, 1).transpose(-1, -2)
        s_hat = q_rot @ k_rot.repeat_interleave(g, 1).transpose(-1, -2)
        mf = (m & read_q).float()
        num = (((s_hat - s) * mf) ** 2).sum(dim=(0, 2, 3))
        errs.append((num / ((s * m.float()) ** 2).sum(dim=(0, 2, 3))).sqrt())
    return torch.stack(errs).double()


@pytest.mark.parametrize("family", ROTARY)
def test_identity_has_no_error_in_either_frame(family):
    model, ids = make_model(family), random_ids(2, SEQ)
    err = logit_errors(model, ids, {"post": Fn(identity), "pre": Fn(identity, "pre")}, progress=False)
    assert err["post"].shape == (2, 4) and torch.all(err["post"] == 0)
    assert err["pre"].max() < 1e-5  # float32 round trip through the rotation only


@pytest.mark.parametrize("family", ROTARY)
def test_pre_equals_post_for_a_quantizer_commuting_with_rotation(family):
    model, ids = make_model(family), random_ids(2, SEQ)
    err = logit_errors(model, ids, {"post": Fn(scale), "pre": Fn(scale, "pre")}, progress=False)
    want = torch.tensor([abs((1.1 + 0.05 * layer) * 0.9 - 1) for layer in range(2)], dtype=torch.float64)
    torch.testing.assert_close(err["post"], want[:, None].expand(2, 4), rtol=1e-4, atol=0)
    torch.testing.assert_close(err["pre"], err["post"], rtol=1e-4, atol=0)


def test_pre_rope_error_is_that_of_the_rotated_back_logits():
    model, ids = make_model("llama"), random_ids(2, SEQ)
    err = logit_errors(model, ids, {"pre": Fn(rounding, "pre"), "post": Fn(rounding)}, progress=False)
    torch.testing.assert_close(err["pre"], reference(model, ids, rounding), rtol=1e-4, atol=1e-6)
    assert (err["pre"] - err["post"]).abs().max() > 1e-3  # the frame matters for this quantizer


def test_pre_rope_needs_a_rotary_model():
    with pytest.raises(ValueError, match="rotary"):
        logit_errors(make_model("gpt2"), random_ids(1, SEQ), {"pre": Fn(identity, "pre")}, progress=False)


def test_deployed_keys_only_block_causal():
    model, ids, books = tiny_books(norm="channel-group", group=8, sink=1, rope="pre", bits_q=3, bits_k=3)
    assert books.key_group == 8
    quant = {"deployed": KeysOnly(books), "all keys": KeysOnly(books, key_group=0)}
    err = logit_errors(model, ids, quant, progress=False)
    apply = lambda x, layer, side: books.k.apply(x, layer) if side == "k" else x  # noqa: E731
    torch.testing.assert_close(err["deployed"], reference(model, ids, apply, keys_only=True, group=8),
                               rtol=1e-4, atol=1e-6)
    # the quantized keys are the same, but every query would read its own group's keys quantized
    assert torch.all(err["all keys"] > err["deployed"])
    short = logit_errors(model, ids[:, :7], {"deployed": KeysOnly(books)}, progress=False)["deployed"]
    assert torch.all(short == 0)  # no group of 8 is complete: every key is read exact


def test_keys_only_baseline_at_the_same_place():
    model, ids = make_model("llama"), random_ids(2, 24)
    base = Baseline("int4", rope="pre")
    err = logit_errors(model, ids, {"keys": KeysOnly(base, key_group=8)}, progress=False)["keys"]
    want = reference(model, ids, lambda x, layer, side: base(x, layer, side), keys_only=True, group=8)
    torch.testing.assert_close(err, want, rtol=1e-4, atol=1e-6)


def test_query_key_pair_quantizes_each_side_with_its_own_quantizer():
    """Causal per-token INT queries beside block-causal codebook keys: the reference quantizes the
    queries with the one and the keys with the other, and reads keys quantized once their group is in."""
    model, ids, books = tiny_books(norm="channel-group", group=8, sink=1, rope="pre", bits_q=3, bits_k=3)
    queries = Baseline("int4", rope="pre")
    pair = QueryKeyPair(queries, books)
    assert pair.sides == ("q", "k") and pair.key_group == 8 and pair.rope == "pre"
    err = logit_errors(model, ids, {"pair": pair}, progress=False)["pair"]
    both = lambda x, layer, side: queries(x, layer, side) if side == "q" else books.k.apply(x, layer)  # noqa: E731
    torch.testing.assert_close(err, reference(model, ids, both, group=8), rtol=1e-4, atol=1e-6)
    keys_only = logit_errors(model, ids, {"k": KeysOnly(books)}, progress=False)["k"]
    assert torch.all(err > keys_only)  # the queries' error adds to the keys'
    assert pair.effective_bits(head_dim=16, seqlen=SEQ) == pytest.approx(
        0.5 * (queries.effective_bits(16) + books.effective_bits(16, SEQ)))


def test_query_key_pair_refuses_two_frames():
    with pytest.raises(ValueError, match="different frames"):
        QueryKeyPair(Baseline("int4"), Baseline("int4", rope="pre"))
