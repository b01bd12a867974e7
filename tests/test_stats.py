"""PairStats: capture statistics against a brute-force loop over allowed (t, s, j) pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    EXPECTED_WINDOWS,
    GQA_FAMILIES,
    SEQ,
    WINDOW,
    left_padded,
    make_model,
    random_ids,
)

import kvquant
from kvquant.io.fingerprint import ModelFingerprint
from kvquant.core.stats import HeadMoments, PairStats, gqa_pooled_rho
from kvquant.hf.wrap import controller

SUMS = ("n", "sq", "sqq", "sk", "skk", "sqk")


def allowed(t: int, s: int, window: int | None, real: np.ndarray | None) -> bool:
    """Query t may attend key s: causal, inside the window, neither position padded."""
    if s > t:
        return False
    if window is not None and t - s >= window:
        return False
    if real is not None and not (real[t] and real[s]):
        return False
    return True


def brute_force(q, k, window, attn_mask_2d=None) -> dict[str, np.ndarray]:
    """Sums over allowed pairs by explicit loops (query head h uses KV head h // g)."""
    q, k = q.double().numpy(), k.double().numpy()
    b_n, h_n, t_n, d = q.shape
    g = h_n // k.shape[1]
    out = {name: np.zeros((h_n, d)) for name in SUMS}
    out["absmax_q"], out["absmax_k"] = np.zeros((h_n, d)), np.zeros((h_n, d))
    for b in range(b_n):
        real = None if attn_mask_2d is None else attn_mask_2d[b].numpy().astype(bool)
        for h in range(h_n):
            for t in range(t_n):
                for s in range(k.shape[2]):
                    if not allowed(t, s, window, real):
                        continue
                    x, y = q[b, h, t], k[b, h // g, s]
                    out["n"][h] += 1
                    out["sq"][h] += x
                    out["sqq"][h] += x * x
                    out["sk"][h] += y
                    out["skk"][h] += y * y
                    out["sqk"][h] += x * y
                    out["absmax_q"][h] = np.maximum(out["absmax_q"][h], np.abs(x))
                    out["absmax_k"][h] = np.maximum(out["absmax_k"][h], np.abs(y))
    return out


def assert_sums_match(stats: PairStats, layer: int, want: dict[str, np.ndarray], names=SUMS + ("absmax_q", "absmax_k")):
    for name in names:
        got = getattr(stats, name)[layer].numpy()
        np.testing.assert_allclose(got, want[name], rtol=1e-9, atol=1e-9 * np.abs(want[name]).max(), err_msg=name)


def capture(model, ids, attn_mask=None):
    """Capture through the wrapped model; returns (stats, [(layer, q, k, mask)])."""
    fp = ModelFingerprint.from_model(model)
    stats = PairStats.zeros(fp.num_layers, fp.num_heads, fp.head_dim)
    seen = []

    def observer(layer, q, k, mask):
        seen.append((layer, q.clone(), k.clone(), mask.clone()))
        stats.update(layer, q, k, mask)

    with kvquant.wrapped(model):
        ctl = controller(model)
        ctl.observer = observer
        ctl.set_mode("capture")
        with torch.no_grad():
            model(ids, attention_mask=attn_mask, use_cache=False)
    return stats, seen


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gpt2"])
def test_capture_matches_brute_force_with_padding(family):
    model = make_model(family)
    ids, am = left_padded(pads=(0, 3))
    stats, seen = capture(model, ids, am)
    assert [layer for layer, *_ in seen] == [0, 1]
    for layer, q, k, _ in seen:
        assert_sums_match(stats, layer, brute_force(q, k, EXPECTED_WINDOWS[family][layer], am))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3"])
def test_sliding_window_pair_count_is_windowed_not_causal(family):
    model = make_model(family)
    stats, seen = capture(model, random_ids(2, SEQ))
    causal = SEQ * (SEQ + 1) // 2  # 78
    windowed = sum(min(t + 1, WINDOW) for t in range(SEQ))  # 42
    assert windowed < causal
    for layer, q, k, _ in seen:
        window = EXPECTED_WINDOWS[family][layer]
        want = 2 * (windowed if window else causal)
        assert torch.all(stats.n[layer] == want), (layer, stats.n[layer].unique())
        assert_sums_match(stats, layer, brute_force(q, k, window))


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_mapping_query_head_uses_kv_head_h_div_g(family):
    model = make_model(family)
    stats, seen = capture(model, random_ids(1, SEQ))
    for layer, q, k, _ in seen:
        assert q.shape[1] == 4 and k.shape[1] == 2
        # key sums of query heads 0,1 come from KV head 0, heads 2,3 from KV head 1
        assert torch.equal(stats.sk[layer, 0], stats.sk[layer, 1])
        assert torch.equal(stats.sk[layer, 2], stats.sk[layer, 3])
        assert not torch.allclose(stats.sk[layer, 0], stats.sk[layer, 2])
        # the cross term pairs query head h with KV head h // 2 (not h % 2)
        want = brute_force(q, k, EXPECTED_WINDOWS[family][layer])
        np.testing.assert_allclose(stats.sqk[layer].numpy(), want["sqk"], rtol=1e-9, atol=1e-12)


def test_update_hand_example():
    """One head, T = S = 2, causal: pairs (0,0), (1,0), (1,1)."""
    q = torch.tensor([[[[1.0], [2.0]]]])
    k = torch.tensor([[[[3.0], [5.0]]]])
    mask = torch.tensor([[[[True, False], [True, True]]]])
    st = PairStats.zeros(1, 1, 1)
    st.update(0, q, k, mask)
    assert st.n.item() == 3
    assert st.sq.item() == 1 + 2 + 2 and st.sqq.item() == 1 + 4 + 4
    assert st.sk.item() == 3 + 3 + 5 and st.skk.item() == 9 + 9 + 25
    assert st.sqk.item() == 1 * 3 + 2 * 3 + 2 * 5
    assert st.absmax_q.item() == 2 and st.absmax_k.item() == 5


def _random_update(stats, layer, b, seed, pads=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, 7, 3, generator=g)
    k = torch.randn(b, 2, 7, 3, generator=g) + 1.5
    t = torch.arange(7)
    mask = (t[None, :] <= t[:, None]).expand(b, 1, 7, 7).clone()
    if pads is not None:
        for i, p in enumerate(pads):
            mask[i, :, :, :p] = False
            mask[i, :, :p, :] = False
    stats.update(layer, q, k, mask)
    return q, k, mask


def test_merge_of_two_chunks_equals_one_batch():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 4, 7, 3, generator=g)
    k = torch.randn(4, 2, 7, 3, generator=g) * 2 + 1
    t = torch.arange(7)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 3)
    mask = mask.expand(4, 1, 7, 7).clone()
    mask[1, :, :, :2] = False
    mask[1, :, :2, :] = False
    whole, a, b = PairStats.zeros(2, 4, 3), PairStats.zeros(2, 4, 3), PairStats.zeros(2, 4, 3)
    for layer in range(2):
        whole.update(layer, q * (layer + 1), k, mask)
        a.update(layer, q[:2] * (layer + 1), k[:2], mask[:2])
        b.update(layer, q[2:] * (layer + 1), k[2:], mask[2:])
    merged = a.merge(b)
    for name in SUMS + ("absmax_q", "absmax_k"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    # merging does not modify its inputs
    assert a.n.sum() + b.n.sum() == whole.n.sum() and a.n.sum() < whole.n.sum()


def test_merge_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        PairStats.zeros(2, 4, 3).merge(PairStats.zeros(2, 4, 5))


def test_update_validates_inputs():
    st = PairStats.zeros(1, 3, 2)
    q, k = torch.zeros(1, 3, 4, 2), torch.zeros(1, 2, 4, 2)
    with pytest.raises(ValueError, match="split"):
        st.update(0, q, k, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    st = PairStats.zeros(1, 4, 2)
    q = torch.zeros(1, 4, 4, 2)
    with pytest.raises(ValueError, match="bool"):
        st.update(0, q, k, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="bool"):
        st.update(0, q, k, torch.ones(1, 1, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="all heads"):
        st.update(0, q, k, torch.ones(1, 4, 4, 4, dtype=torch.bool))


def test_moments_match_numpy_over_explicit_pairs():
    st = PairStats.zeros(1, 4, 3)
    q, k, mask = _random_update(st, 0, 2, seed=5, pads=(0, 2))
    xs = {h: [] for h in range(4)}
    ys = {h: [] for h in range(4)}
    for b in range(2):
        for h in range(4):
            for t in range(7):
                for s in range(7):
                    if mask[b, 0, t, s]:
                        xs[h].append(q[b, h, t].double().numpy())
                        ys[h].append(k[b, h // 2, s].double().numpy())
    hm, cm = st.head_moments(), st.channel_moments()
    for h in range(4):
        x, y = np.stack(xs[h]), np.stack(ys[h])  # (pairs, D)
        # per channel
        np.testing.assert_allclose(cm.mean_q[0, h].numpy(), x.mean(0), rtol=1e-9)
        np.testing.assert_allclose(cm.sigma_k[0, h].numpy(), y.std(0), rtol=1e-9)
        for j in range(3):
            np.testing.assert_allclose(cm.rho[0, h, j].item(), np.corrcoef(x[:, j], y[:, j])[0, 1], rtol=1e-9, atol=1e-12)
        # per head: channels pooled
        xf, yf = x.reshape(-1), y.reshape(-1)
        assert hm.pairs[0, h].item() == xf.size
        np.testing.assert_allclose(hm.mean_k[0, h].item(), yf.mean(), rtol=1e-9)
        np.testing.assert_allclose(hm.sigma_q[0, h].item(), xf.std(), rtol=1e-9)
        np.testing.assert_allclose(hm.rho[0, h].item(), np.corrcoef(xf, yf)[0, 1], rtol=1e-9, atol=1e-12)


def test_moments_need_pairs():
    with pytest.raises(ValueError, match="no pairs"):
        PairStats.zeros(1, 2, 2).head_moments()


def test_dict_round_trip():
    st = PairStats.zeros(1, 4, 3)
    _random_update(st, 0, 2, seed=7)
    back = PairStats.from_dict({k: v.float() if k == "n" else v for k, v in st.to_dict().items()})
    for name in SUMS:
        assert getattr(back, name).dtype == torch.float64
        torch.testing.assert_close(getattr(back, name), getattr(st, name))


def test_gqa_pooled_rho_hand_example():
    sigma_q = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    rho = torch.tensor([0.5, -0.2, 0.1, 0.3], dtype=torch.float64)
    got = gqa_pooled_rho(sigma_q, rho, 2)
    # KV head 0: (1·0.25 + 4·0.04) / 5 = 0.082, Σ σ²ρ = 0.5 − 0.8 < 0 → negative
    # KV head 1: (9·0.01 + 1·0.09) / 10 = 0.018, Σ σ²ρ = 0.9 + 0.3 > 0 → positive
    torch.testing.assert_close(got, torch.tensor([-(0.082**0.5), 0.018**0.5], dtype=torch.float64))
    # g = 1: every query head is its own KV head, ρ_eff = ρ
    torch.testing.assert_close(gqa_pooled_rho(sigma_q, rho, 1), rho)
    # batched over layers (…, H)
    assert gqa_pooled_rho(sigma_q.expand(3, 4), rho.expand(3, 4), 4).shape == (3, 1)


def test_head_moments_from_sums_clamps_and_correlation_bounds():
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731  (PairStats sums are float64)
    hm = HeadMoments.from_sums(f64(4.0), f64(4.0), f64(4.0), f64(0.0), f64(4.0), f64(0.0))
    assert hm.sigma_q.item() == 0 and hm.rho.item() == 0  # constant X: σ 0, no NaN
