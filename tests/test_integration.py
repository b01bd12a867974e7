"""The real offline model (SmolLM2-135M, Llama, GQA 9q/3kv, head_dim 64) on enwiki-excerpt.

seqlen 256; 2 calibration windows from the end of the text, 2 evaluation windows from its start.
The last test re-derives the quantized perplexity WITHOUT kvquant's attention function: the
unwrapped (SDPA) model with transformers' ``apply_rotary_pos_emb`` patched to quantize its
outputs by hand from the tensors stored in the saved codebook file.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import kvquant
from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.evaluation.perplexity import evaluate, make_rows
from kvquant.hf.wrap import is_wrapped

pytestmark = pytest.mark.integration

SEQLEN = 256
MODEL = "smollm2-135m"
CORPUS = "enwiki-excerpt"


@pytest.fixture(scope="module")
def real():
    from kvquant.io.assets import load_model
    from kvquant.io.data import load_text, split_calib_eval

    model, tok = load_model(MODEL, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
    calib, evals = split_calib_eval(tok, load_text(CORPUS), SEQLEN, 2, 2, source=CORPUS)
    assert not calib.overlaps(evals)
    return model, calib, evals


@pytest.fixture(scope="module")
def results(real, tmp_path_factory):
    """Calibrate once (4 bits, saved to a file), evaluate fp, lambda 4-bit (from the file), lambda 8-bit."""
    model, calib, evals = real
    books4 = calibrate(model, calib, CalibrationConfig(CodebookConfig("lambda", 4, 4)), source=CORPUS, progress=False)
    path = tmp_path_factory.mktemp("books") / "smollm2-lambda4.safetensors"
    books4.save(path)
    loaded = Codebooks.load(path)
    rows = make_rows(["fp", "lambda"], loaded)
    rows["lambda-8bit"] = books4.rebuilt(bits_q=8, bits_k=8)
    out = evaluate(model, evals, rows, progress=False)
    assert not is_wrapped(model)
    return out, path


@torch.no_grad()
def test_off_mode_identical_logits(real):
    model, _, evals = real
    ids = evals.ids[:, :128]
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding on the second row
    ref, ref_padded = model(ids, use_cache=False).logits, model(ids, attention_mask=mask, use_cache=False).logits
    with kvquant.wrapped(model):
        out = model(ids, use_cache=False).logits
        out_padded = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(out, ref)
    assert torch.equal(out_padded, ref_padded)
    assert not torch.allclose(out_padded[1, 17:], out[1, 17:])  # the padding mask took effect


def test_perplexity_fp_vs_lambda(results):
    rows, _ = results
    fp, l8, l4 = rows["fp"].ppl, rows["lambda-8bit"].ppl, rows["lambda"].ppl
    assert list(rows) == ["fp", "lambda", "lambda-8bit"]
    assert rows["fp"].tokens == 2 * (SEQLEN - 1)
    assert 1 < fp < 100, fp
    assert abs(l8 / fp - 1) < 0.02, (fp, l8)
    assert math.isfinite(l4) and l4 > fp, (fp, l4)
    assert rows["lambda"].effective_bits == 4.0 and rows["lambda-8bit"].effective_bits == 8.0
    assert rows["fp"].effective_bits == 32.0


@torch.no_grad()
def test_lambda_row_matches_hand_quantized_rope(real, results, monkeypatch):
    """Independent check of the ``lambda`` row: nearest center per head, x̃ = (x − offset)/scale,
    applied to RoPE's outputs in the unwrapped model."""
    import transformers.models.llama.modeling_llama as ml

    model, _, evals = real
    rows, path = results
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    n_layers = model.config.num_hidden_layers
    assert t["q.centers"].shape == (n_layers, 9, 16) and t["k.centers"].shape == (n_layers, 3, 16)

    def by_hand(x, side, layer):
        centers = t[f"{side}.centers"][layer]  # (H, K)
        off = t[f"{side}.offset"][layer][None, :, None, :]  # (1, H, 1, D)
        scale = t[f"{side}.scale"][layer][None, :, None, :]
        xt = (x - off) / scale
        idx = (xt[..., None] - centers[None, :, None, None, :]).abs().argmin(-1)  # (B, H, T, D)
        c = centers[None, :, None, None, :].expand(*idx.shape, centers.shape[-1])
        return off + scale * c.gather(-1, idx[..., None]).squeeze(-1)

    calls = []
    original = ml.apply_rotary_pos_emb

    def quantized_rope(*args, **kwargs):
        q, k = original(*args, **kwargs)
        layer = len(calls) % n_layers
        calls.append(layer)
        return by_hand(q, "q", layer), by_hand(k, "k", layer)

    monkeypatch.setattr(ml, "apply_rotary_pos_emb", quantized_rope)
    assert model.config._attn_implementation == "sdpa" and not is_wrapped(model)
    total, count = 0.0, 0
    for row in evals.ids:
        logits = model(row[None], use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, row[1:], reduction="sum").double())
        count += len(row) - 1
    assert len(calls) == n_layers * len(evals.ids)
    ppl = math.exp(total / count)
    assert ppl != pytest.approx(rows["fp"].ppl, rel=1e-3)
    assert ppl == pytest.approx(rows["lambda"].ppl, rel=0.01), (ppl, rows["lambda"].ppl, rows["fp"].ppl)
