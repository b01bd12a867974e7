"""capture_stats / calibrate on tiny models; codebooks from the captured statistics, their file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXPECTED_WINDOWS, FAMILIES, SEQ, make_model, random_ids
from safetensors.torch import save_file
from test_stats import SUMS, brute_force

import kvquant
from kvquant.codebooks import books as codebooks_module
from kvquant.hf.calibrate import CalibrationConfig, calibrate, capture_stats, summary
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.io.fingerprint import ModelFingerprint
from kvquant.core.stats import PairStats
from kvquant.hf.wrap import UnsupportedModelError, is_wrapped


def calib(model, bits=4, method="lambda", windows=None, **kw):
    windows = random_ids(3, SEQ, seed=11) if windows is None else windows
    config = CalibrationConfig(CodebookConfig(method=method, bits_q=bits, bits_k=bits, **kw))
    return calibrate(model, windows, config, source="random", progress=False)


@torch.no_grad()
def logits(model, ids, quantizer=None):
    with kvquant.wrapped(model, quantizer):
        return model(ids, use_cache=False).logits


# --- capture_stats -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gptneox"])
def test_capture_stats_matches_brute_force(family, monkeypatch):
    """capture_stats (3 windows in batches of 2) equals loops over the q/k it was handed."""
    model = make_model(family)
    seen = []
    original = PairStats.update

    def recording_update(self, layer, q, k, mask):
        seen.append((layer, q.clone(), k.clone()))
        return original(self, layer, q, k, mask)

    monkeypatch.setattr(PairStats, "update", recording_update)
    stats = capture_stats(model, random_ids(3, SEQ, seed=4), batch_size=2, progress=False)
    assert [(layer, q.shape[0]) for layer, q, _ in seen] == [(0, 2), (1, 2), (0, 1), (1, 1)]
    assert stats.shape == (2, 4, 16)
    for layer in range(2):
        want = None
        for lyr, q, k in seen:
            if lyr != layer:
                continue
            part = brute_force(q, k, EXPECTED_WINDOWS[family][layer])
            want = part if want is None else {
                n: (np.maximum(want[n], part[n]) if n.startswith("absmax") else want[n] + part[n]) for n in part
            }
        for name in SUMS + ("absmax_q", "absmax_k"):
            np.testing.assert_allclose(getattr(stats, name)[layer].numpy(), want[name], rtol=1e-9,
                                       atol=1e-9 * np.abs(want[name]).max(), err_msg=f"{name} layer {layer}")
    assert not is_wrapped(model)


def test_capture_stats_does_not_depend_on_batch_size(llama):
    ids = random_ids(3, SEQ, seed=4)
    one = capture_stats(llama, ids, batch_size=1, progress=False)
    three = capture_stats(llama, ids, batch_size=3, progress=False)
    for name in SUMS:
        torch.testing.assert_close(getattr(one, name), getattr(three, name), rtol=1e-12, atol=1e-9)


def test_capture_stats_refuses_layers_that_bypass_the_interface(llama):
    """A layer whose attention never calls kvquant's function (simulated by replacing its
    forward) must not pass silently: the error names the layer."""
    attn = llama.model.layers[1].self_attn
    attn.forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None)
    with pytest.raises(UnsupportedModelError, match=r"layers \[1\]"):
        capture_stats(llama, random_ids(1, SEQ), progress=False)
    assert not is_wrapped(llama) and llama.config._attn_implementation == "sdpa"


def test_calibration_input_validation(llama):
    for bad in (torch.zeros(0, 8, dtype=torch.long), torch.arange(8), [[1, 2, 3]]):
        with pytest.raises(ValueError, match="token windows"):
            capture_stats(llama, bad, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        CalibrationConfig(batch_size=0)
    with pytest.raises(ValueError, match="bits_q"):
        CodebookConfig(bits_q=9)
    with pytest.raises(ValueError, match="method"):
        CodebookConfig(method="kmeans")


# --- codebooks from captured statistics ----------------------------------------------------


def test_calibrate_builds_gqa_codebooks(llama):
    books = calib(llama, bits=3)
    assert not is_wrapped(llama)
    assert books.q.centers.shape == (2, 4, 8) and books.q.boundaries.shape == (2, 4, 7)
    assert books.k.centers.shape == (2, 2, 8) and books.k.boundaries.shape == (2, 2, 7)  # H_kv rows
    assert books.q.offset.shape == books.q.scale.shape == (2, 4, 16)
    assert books.k.offset.shape == books.k.scale.shape == (2, 2, 16)
    hm = books.stats.head_moments()
    # key normalisation of KV head h comes from the key statistics of its query heads (2h, 2h+1)
    torch.testing.assert_close(books.k.offset[:, :, 0].double(), hm.mean_k[:, ::2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(books.k.scale[:, :, 0].double(), hm.sigma_k[:, ::2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(books.q.scale[:, :, 0].double(), hm.sigma_q, rtol=1e-6, atol=1e-7)
    assert books.calibration == {"source": "random", "windows": 3, "seqlen": SEQ}
    assert books.fingerprint == ModelFingerprint.from_model(llama)
    assert books.effective_bits() == 3.0
    assert len(summary(books)) == 3


def test_channel_norm_codebooks(llama):
    books = calib(llama, bits=4, norm="channel")
    cm = books.stats.channel_moments()
    torch.testing.assert_close(books.q.offset.double(), cm.mean_q, rtol=1e-6, atol=1e-7)
    assert books.k.offset.shape == (2, 2, 16)
    ids = random_ids(2, SEQ, seed=9)
    out = logits(llama, ids, books)
    assert torch.isfinite(out).all() and not torch.equal(out, logits(llama, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_codebooks_change_logits_moderately(family):
    model = make_model(family)
    ids = random_ids(2, SEQ, seed=9)  # not the calibration windows
    ref = logits(model, ids)
    change = {}
    for bits in (8, 2):
        books = calib(model, bits)
        seen = []

        def spy(x, layer, side):
            y = books(x, layer, side)
            seen.append((side, bool(torch.isfinite(y).all()), not torch.equal(x, y)))
            return y

        out = logits(model, ids, spy)
        # (torch's CPU SDPA silently turns NaN scores into zeros, so look at q̂, k̂ themselves)
        assert [s for s, _, _ in seen] == ["q", "k", "q", "k"]
        assert all(finite for _, finite, _ in seen), f"{bits} bits: non-finite quantized q/k"
        assert all(changed for _, _, changed in seen), f"{bits} bits: q/k unchanged"
        assert torch.isfinite(out).all(), f"{bits} bits"
        change[bits] = float((out - ref).norm() / ref.norm())
    assert 0 < change[8] < 0.05, change
    assert change[8] < change[2] < 1.5, change


def test_codebooks_quantize_only_q_and_k_onto_their_centers(llama):
    """What the quantizer returns lies on offset + scale · center for the right head."""
    books = calib(llama, bits=2)
    seen = []

    def spy(x, layer, side):
        y = books(x, layer, side)
        seen.append((layer, side, y))
        return y

    logits(llama, random_ids(1, SEQ), spy)
    assert [(layer, side) for layer, side, _ in seen] == [(0, "q"), (0, "k"), (1, "q"), (1, "k")]
    for layer, side, y in seen:
        sb = books.q if side == "q" else books.k
        xn = (y - sb.offset[layer][None, :, None, :]) / sb.scale[layer][None, :, None, :]
        for h in range(y.shape[1]):
            dist = (xn[0, h].reshape(-1, 1) - sb.centers[layer, h][None, :]).abs().min(-1).values
            assert dist.max() < 1e-4, (layer, side, h)


# --- mismatch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_hidden_layers": 3}, "num_layers"),
        ({"num_attention_heads": 8, "num_key_value_heads": 4}, "num_heads"),
        ({"num_key_value_heads": 4}, "num_kv_heads"),
        ({"head_dim": 8}, "head_dim"),
        ({"rope_theta": 500.0}, "config_hash"),
    ],
)
def test_mismatched_model_is_refused(llama, overrides, field):
    books = calib(llama)
    other = make_model("llama", **overrides)
    with pytest.raises(ValueError, match=field) as err:
        books.check_fits(other)
    assert "calibrate" in str(err.value)
    with pytest.raises(ValueError, match=field):
        kvquant.wrap(other, books)
    assert not is_wrapped(other)


def test_other_family_is_refused(llama):
    books = calib(llama)
    with pytest.raises(ValueError, match="model_type: codebooks have 'llama', model has 'gpt2'"):
        kvquant.wrap(make_model("gpt2"), books)


def test_same_architecture_other_weights_fits(llama):
    books = calib(llama)
    books.check_fits(make_model("llama", seed=5))


# --- the codebook file ---------------------------------------------------------------------


def test_file_round_trip(llama, tmp_path):
    books = calib(llama, bits=3)
    path = tmp_path / "books.safetensors"
    books.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books.safetensors"]  # no temp file left
    back = Codebooks.load(path)
    assert back.config == books.config and back.fingerprint == books.fingerprint
    assert back.calibration == books.calibration
    for side in ("q", "k"):
        a, b = getattr(books, side), getattr(back, side)
        assert a.bits == b.bits
        for name in ("centers", "boundaries", "offset", "scale"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (side, name)
    for name, t in books.stats.to_dict().items():
        assert torch.equal(getattr(back.stats, name), t), name
    ids = random_ids(2, SEQ, seed=9)
    assert torch.equal(logits(llama, ids, back), logits(llama, ids, books))


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no codebook file"):
        Codebooks.load(tmp_path / "nope.safetensors")


def test_load_non_kvquant_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a kvquant codebook file"):
        Codebooks.load(path)


def test_load_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        Codebooks.load(path)


def test_load_other_format_version(llama, tmp_path, monkeypatch):
    books = calib(llama)
    monkeypatch.setattr(codebooks_module, "FORMAT_VERSION", 99)
    books.save(tmp_path / "b.safetensors")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format version 99"):
        Codebooks.load(tmp_path / "b.safetensors")


def test_load_refuses_per_head_allocation_files(llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    calib(llama).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**t, "q.head_bits": torch.zeros(2, 4, dtype=torch.int8)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="per head.*re-run `kvquant calibrate`"):
        Codebooks.load(path)


def test_failed_save_leaves_no_partial_file(llama, tmp_path, monkeypatch):
    books = calib(llama)
    target = tmp_path / "books.safetensors"

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(codebooks_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        books.save(target)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left as it was
    monkeypatch.undo()
    books.save(target)
    before = target.read_bytes()
    monkeypatch.setattr(codebooks_module, "save_file", failing_save)
    with pytest.raises(OSError):
        calib(llama, bits=2).save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["books.safetensors"]


def test_file_metadata_is_readable_json(llama, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "b.safetensors"
    calib(llama).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "kvquant-codebooks"
    assert json.loads(meta["config"])["method"] == "lambda"
    assert json.loads(meta["fingerprint"])["num_kv_heads"] == 2
