"""Dense-and-sparse outliers for the channel-group normalisation (kvquant.core.groupnorm.group_split)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_books
from safetensors import safe_open
from safetensors.torch import save_file

from kvquant.core import scalar as cb
from kvquant.codebooks import CodebookConfig, Codebooks, SideBooks
from kvquant.core.groupnorm import (
    GroupHistogram,
    causal_groups,
    group_minmax,
    group_restore,
    group_split,
    outlier_count,
)


def _side(bits=2, heads=2, d=8, group=16, sink=0, outliers=0.0):
    c = torch.linspace(-1, 1, 2**bits).expand(1, heads, 2**bits).contiguous()
    b = (0.5 * (c[..., 1:] + c[..., :-1])).contiguous()
    return SideBooks(bits, c, b, torch.zeros(1, heads, d), torch.ones(1, heads, d), group, sink, outliers)


def _heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.distributions.StudentT(2.0).sample((shape[-1],)).abs().clamp(0.2, 5)


@pytest.mark.parametrize("p", [0.01, 0.05, 0.2])
def test_exactly_ceil_p_entries_per_block_are_exact(p):
    g, d, t = 16, 8, 45  # two full groups and a partial one of 13 tokens
    x = _heavy((2, 3, t, d))
    xt, mid, half, exact = group_split(x, g, p)
    per_block = [int(exact[:, :, s:s + g].sum((2, 3)).unique().item()) for s in range(0, t, g)]
    assert per_block == [math.ceil(p * g * d)] * 2 + [outlier_count(p, 13 * d)]
    out = _side(group=g, d=d, heads=3, outliers=p).apply(x, 0)
    assert torch.equal(out[exact], x[exact])
    assert not torch.equal(out[~exact], x[~exact])
    # the others lie inside their channel's reduced range, and x̃ is 0 at the exact entries
    assert xt.abs().max() <= 1 + 2e-3 and torch.all(xt[exact] == 0)  # (mid, half) rounded to fp16 as stored
    back = group_restore(xt, mid, half, g)
    torch.testing.assert_close(back[~exact], x[~exact], rtol=1e-5, atol=1e-5)


def test_outlier_count_rounds_before_ceiling():
    assert outlier_count(0.25, 16) == 4 and outlier_count(0.005, 128 * 64) == 41
    assert outlier_count(0.01, 128 * 64) == 82 and outlier_count(0.0, 8192) == 0 and outlier_count(1e-9, 10) == 1


def test_p_zero_is_bit_identical_to_plain_minmax():
    x = _heavy((2, 2, 37, 8), seed=1)
    side = _side(bits=3, group=16, outliers=0.0)
    centers, bounds = side.centers[0], side.boundaries[0]
    xt, mid, half = group_minmax(x[:, :, :32], 16)
    before = group_restore(cb.fake_quantize(xt, centers, bounds, dim=1), mid, half, 16)
    out = side.apply(x, 0)  # two complete groups of 16; the newest 5 tokens stay exact
    assert torch.equal(out[:, :, :32], before) and torch.equal(out[:, :, 32:], x[:, :, 32:])
    xt, mid, half = group_minmax(x, 16)
    xt0, mid0, half0, exact0 = group_split(x, 16, 0.0)
    assert torch.equal(xt0, xt) and torch.equal(mid0, mid) and torch.equal(half0, half) and not exact0.any()


def test_planted_outlier_no_longer_widens_its_channel():
    torch.manual_seed(2)
    x = torch.randn(1, 1, 32, 8)
    x[0, 0, 5, 3] = 1000.0
    _, _, half0 = group_minmax(x, 32)
    _, _, half, exact = group_split(x, 32, 0.01)  # ⌈0.01·256⌉ = 3 entries kept exact
    assert exact[0, 0, 5, 3] and int(exact.sum()) == 3
    assert half0[0, 0, 0, 0, 3] > 400 and half[0, 0, 0, 0, 3] < 5
    err0 = (_side(bits=3, heads=1, group=32).apply(x, 0) - x)[..., 3].square().sum()
    err = (_side(bits=3, heads=1, group=32, outliers=0.01).apply(x, 0) - x)[..., 3].square().sum()
    assert err < 0.02 * err0  # the other 31 tokens of channel 3 get a grid ~100× finer


def test_constant_channel_and_fully_exact_channel():
    x = torch.ones(1, 1, 8, 4) * 3.0
    xt, mid, half, exact = group_split(x, 4, 0.1)  # MAD = 0 everywhere: nothing sticks out
    assert torch.equal(group_restore(xt, mid, half, 4), x) and int(exact.sum()) == 4
    # a channel whose two tokens both become exact still restores the rest exactly
    y = torch.zeros(1, 1, 2, 4)
    y[0, 0, :, 1] = torch.tensor([50.0, -70.0])
    out = _side(bits=2, heads=1, d=4, group=2, outliers=0.25).apply(y, 0)
    assert torch.equal(out, y)


def test_non_finite_input_raises_like_static_scales():
    x = torch.randn(1, 2, 20, 8)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 1, 7, 2] = bad
        for p in (0.0, 0.05):
            with pytest.raises(ValueError, match="NaN or infinite"):
                _side(group=8, outliers=p).apply(y, 0)
        with pytest.raises(ValueError, match="NaN or infinite"):
            group_split(y, 8, 0.05)


@pytest.mark.parametrize("bad", [-0.01, 0.5, 0.7, float("nan"), "0.1"])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="outliers"):
        CodebookConfig(norm="channel-group", outliers=bad)


def test_outliers_need_channel_group():
    with pytest.raises(ValueError, match="channel-group"):
        CodebookConfig(norm="head", outliers=0.01)
    assert CodebookConfig(norm="channel-group", outliers=0.01).outliers == 0.01


def test_histogram_leaves_exact_entries_out():
    torch.manual_seed(3)
    b, h, h_kv, t, d, g, p = 1, 4, 2, 17, 4, 8, 0.1
    q, k = torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d)
    q[0, 1, 4, 2] = 300.0
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    hist = GroupHistogram.zeros(1, h, h_kv, group=g, sink=1, outliers=p, bins=64)
    hist.update(0, q, k, mask)
    # two complete groups (tokens 0–15; the sink and the incomplete group [16, 17) left out), each
    # block keeping outlier_count(p, g·d) entries exact, those of the sink's placeholder not counted
    for x, count in ((q, hist.count_q), (k, hist.count_k)):
        exact = group_split(causal_groups(x, g, 1), g, p)[3]
        assert exact.sum() == x.shape[1] * 2 * outlier_count(p, g * d)
        assert count[0].sum() == x.shape[1] * 15 * d - exact[:, :, 1:].sum()
    plain = GroupHistogram.zeros(1, h, h_kv, group=g, sink=1, bins=64)
    plain.update(0, q, k, mask)
    # the planted entry widened its channel in the plain histogram: its group's weight drops
    assert hist.weight_q[0, 1].sum() < 0.5 * plain.weight_q[0, 1].sum()
    assert hist.key == (g, 1, p, 16) and GroupHistogram.from_dict(hist.to_dict()).key == (g, 1, p, 16)


def test_effective_bits_formula(tmp_path):
    _, _, books = tiny_books(method="lambda", bits_q=2, bits_k=3, norm="channel-group", group=8, sink=1,
                     outliers=0.05)
    n = math.ceil(0.05 * 8 * 8)  # 4 entries per 8 × 8 block, each fp16 + a 6-bit position
    per_entry = 2.5 + 32 / 8 + n / 64 * (16 + 6)
    assert books.effective_bits(seqlen=24) == pytest.approx(per_entry + 16 / 24)  # 3 whole groups + the sink
    # the G = 128, D = 64 numbers quoted in the docstring and the sweep
    cfg = CodebookConfig("lambda", 4, 4, "channel-group", 128, 0, 0.005)
    fake = Codebooks(cfg, replace(books.q, bits=4), replace(books.k, bits=4), books.fingerprint, books.stats)
    assert fake.effective_bits(head_dim=64) == pytest.approx(4 + 0.25 + 41 / 8192 * (16 + 13))


def test_save_load_round_trip_and_old_files(tmp_path):
    model, _, books = tiny_books(method="lambda-lloyd", bits_q=3, bits_k=3, norm="channel-group", group=8, sink=1,
                         outliers=0.05)
    assert books.q.outliers == 0.05 and books.k.outliers == 0.05
    path = tmp_path / "out.safetensors"
    books.save(path)
    again = Codebooks.load(path)
    assert again.config == books.config and again.k.outliers == 0.05 and again.hist.key == (8, 1, 0.05, 16)
    x = torch.randn(1, 4, 24, 8)
    assert torch.equal(again(x, 1, "q"), books(x, 1, "q"))
    assert again.rebuilt(method="uniform").config.outliers == 0.05
    with pytest.raises(ValueError, match="histograms"):
        books.rebuilt(outliers=0.1)
    from kvquant.cache import make_cache

    with pytest.raises(NotImplementedError, match="outliers"):
        make_cache(model, books)

    # a file written before the field existed: no "outliers" in the config nor in the histogram
    _, _, plain = tiny_books(method="lambda", bits_q=3, bits_k=3, norm="channel-group", group=8, sink=1)
    plain.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    cfg = json.loads(meta["config"])
    del cfg["outliers"], t["hist.outliers"]
    meta["config"] = json.dumps(cfg)
    old = tmp_path / "old.safetensors"
    save_file(t, str(old), metadata=meta)
    with pytest.raises(ValueError, match="lacks config.outliers"):  # refused, not read with a default
        Codebooks.load(old)


def test_one_capture_pass_for_several_outlier_settings(tmp_path):
    from kvquant.hf.calibrate import capture

    model, _, books = tiny_books(method="lambda", norm="channel-group", group=8, sink=1, outliers=0.05)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    _, hists = capture(model, ids, [(8, 1), (8, 1, 0.05)], progress=False)
    assert sorted(hists) == [(8, 1, 0.0, 16), (8, 1, 0.05, 16)]
    assert hists[(8, 1, 0.05, 16)].count_q.sum() < hists[(8, 1, 0.0, 16)].count_q.sum()
    cfg = books.config
    again = Codebooks.from_stats(books.stats, cfg, books.fingerprint, {}, hists[(8, 1, 0.05, 16)])
    assert again.config.outliers == 0.05
    with pytest.raises(ValueError, match="outliers 0.05"):
        Codebooks.from_stats(books.stats, cfg, books.fingerprint, {}, hists[(8, 1, 0.0, 16)])
