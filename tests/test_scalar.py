"""Codebooks for the factors of a product, and torch (de)quantization (kvquant.core.scalar)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvquant.core import density as d
from kvquant.core import pair_codebooks as pcb
from kvquant.core import scalar as cb

# Max (1960) / Lloyd: minimum MSE of a K-level quantizer of N(0, 1).
MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def _gauss_pairs(n: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    y = rho * x + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
    return x, y


def _student_t_pairs(n: int, rho: float, dof: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bivariate Student-t (shared χ² scale), with a mean on y: heavy tails, correlated."""
    rng = np.random.default_rng(seed)
    z1 = rng.standard_normal(n)
    z2 = rho * z1 + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
    s = np.sqrt(rng.chisquare(dof, n) / dof)
    return z1 / s, z2 / s + 0.5


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in z]))


def _normal_pdf(z: np.ndarray) -> np.ndarray:
    out = np.exp(-0.5 * np.where(np.isfinite(z), z, 0.0) ** 2) / math.sqrt(2 * math.pi)
    return np.where(np.isfinite(z), out, 0.0)


def _gaussian_cells(book: cb.Codebook) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(cell), E[X; cell], E[X²; cell] for X ~ N(0, 1), exact (erf)."""
    b = np.concatenate([[-np.inf], book.boundaries, [np.inf]])
    lo, hi = b[:-1], b[1:]
    p = _normal_cdf(hi) - _normal_cdf(lo)
    m1 = _normal_pdf(lo) - _normal_pdf(hi)
    lo_pdf = np.where(np.isfinite(lo), np.where(np.isfinite(lo), lo, 0.0) * _normal_pdf(lo), 0.0)
    hi_pdf = np.where(np.isfinite(hi), np.where(np.isfinite(hi), hi, 0.0) * _normal_pdf(hi), 0.0)
    m2 = p + lo_pdf - hi_pdf
    return p, m1, m2


def _gaussian_mse(book: cb.Codebook) -> float:
    p, m1, m2 = _gaussian_cells(book)
    c = book.centers
    return float(np.sum(m2 - 2 * c * m1 + c * c * p))


def _uncentered(book: cb.Codebook, mean: float) -> cb.Codebook:
    return cb.Codebook(book.centers + mean, book.boundaries + mean)


# =========================================================================== validation


@pytest.mark.parametrize("bits", [0, 9, 2.5, -1])
def test_bits_validation_names_bits(bits) -> None:
    with pytest.raises(ValueError, match="bits"):
        cb.levels_for_bits(bits)
    with pytest.raises(ValueError, match="bits"):
        pcb.gaussian_pair_codebooks("lambda", bits, 4, rho=0.5)
    with pytest.raises(ValueError, match="bits"):
        pcb.gaussian_pair_codebooks("lambda", 4, bits, rho=0.5)
    with pytest.raises(ValueError, match="bits"):
        pcb.gaussian_centers("lloydmax", bits)
    x, y = _gauss_pairs(256, 0.5, seed=0)
    with pytest.raises(ValueError, match="bits"):
        pcb.sample_pair_codebooks("lambda", bits, 3, x, y)


def test_levels_for_bits() -> None:
    assert [cb.levels_for_bits(b) for b in range(1, 9)] == [2, 4, 8, 16, 32, 64, 128, 256]
    assert cb.levels_for_bits(4.0) == 16


def test_unknown_method_lists_methods() -> None:
    with pytest.raises(ValueError) as info:
        pcb.gaussian_pair_codebooks("kmeans", 4, 4, rho=0.5)
    for method in cb.METHODS:
        assert method in str(info.value)
    assert "kmeans" in str(info.value)
    x, y = _gauss_pairs(256, 0.5, seed=0)
    with pytest.raises(ValueError) as info:
        pcb.sample_pair_codebooks("Lambda", 3, 3, x, y)
    for method in cb.METHODS:
        assert method in str(info.value)
    assert set(cb.METHODS) == {"uniform", "lloydmax", "lambda", "lambda-lloyd"}


@pytest.mark.parametrize("rho", [1.01, -1.5, float("nan")])
def test_rho_outside_unit_interval_raises(rho: float) -> None:
    with pytest.raises(ValueError, match="rho"):
        pcb.gaussian_pair_codebooks("lambda", 3, 3, rho=rho)
    with pytest.raises(ValueError, match="rho"):
        pcb.GaussianPair(rho)
    with pytest.raises(ValueError, match="rho"):
        pcb.gaussian_centers("lambda-lloyd", 2, rho=rho)


@pytest.mark.parametrize("rho", [1.0, -1.0])
def test_rho_at_the_ends_is_accepted(rho: float) -> None:
    bx, by = pcb.gaussian_pair_codebooks("lambda", 3, 3, rho=rho)
    assert bx.levels == by.levels == 8
    err = pcb.GaussianPair(rho).pair_error(bx, by)
    assert 0.0 < err < 1.0


def test_codebook_validation() -> None:
    with pytest.raises(ValueError):
        cb.Codebook(np.array([0.0, 1.0, 2.0]), np.array([0.5]))  # K-1 boundaries needed
    with pytest.raises(ValueError):
        cb.Codebook(np.array([0.0]), np.array([]))  # K >= 2
    with pytest.raises(ValueError):
        cb.Codebook(np.array([0.0, 1.0, 2.0]), np.array([1.5, 0.5]))  # unsorted boundaries
    with pytest.raises(ValueError):
        cb.Codebook(np.array([0.0, np.nan]), np.array([0.5]))
    book = cb.Codebook.nearest(np.array([2.0, -1.0, 0.0]))
    np.testing.assert_array_equal(book.centers, [-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(book.boundaries, [-0.5, 1.0])
    # code = #{boundaries <= x}: a value on a boundary goes up
    np.testing.assert_array_equal(book.encode(np.array([-3.0, -0.5, 0.9, 1.0, 5.0])), [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(book(np.array([-3.0, 0.2, 7.0])), [-1.0, 0.0, 2.0])


# =========================================================================== torch (de)quantize


def _head_codebooks(levels: int) -> list[cb.Codebook]:
    """A different nearest-centre codebook per head (same K)."""
    bits = int(math.log2(levels))
    rng = np.random.default_rng(levels)
    return [
        cb.compand(d.lambda_star_density(0.0), levels),
        cb.compand(d.lambda_star_density(0.9), levels),
        cb.compand(d.lambda_star_density(0.3, 2.0), levels),
        cb.Codebook.nearest(rng.normal(size=levels) * 2.0 + 0.5),
        cb.Codebook.nearest(np.linspace(-1.0, 3.0, levels)),
        cb.Codebook.nearest(pcb.gaussian_centers("lloydmax", bits) if bits <= 4 else -np.geomspace(1e-3, 5.0, levels)),
    ]


def _stack(books: list[cb.Codebook]) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.tensor(np.stack([b.centers for b in books]), dtype=torch.float64)
    bounds = torch.tensor(np.stack([b.boundaries for b in books]), dtype=torch.float64)
    return centers, bounds


@pytest.mark.parametrize("levels", [4, 16, 256])
def test_quantize_nearest_batched_over_heads(levels: int) -> None:
    books = _head_codebooks(levels)
    centers, bounds = _stack(books)
    heads = len(books)
    g = torch.Generator().manual_seed(levels)
    x = (torch.randn(2, heads, 7, 5, generator=g) * 2.0).to(torch.float32)  # (B, H, T, D)
    codes = cb.quantize(x, bounds, dim=1)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    # brute force: nearest center of that head's codebook
    xd = x.to(torch.float64)
    dist = (xd.unsqueeze(-1) - centers[None, :, None, None, :]).abs()  # (B, H, T, D, K)
    assert torch.equal(codes.long(), dist.argmin(-1))
    # same as the numpy reference, head by head
    for h, book in enumerate(books):
        np.testing.assert_array_equal(codes[:, h].numpy(), book.encode(xd[:, h].numpy()))
    deq = cb.dequantize(codes, centers, dim=1)
    assert deq.shape == x.shape
    for h in range(heads):
        assert torch.isin(deq[:, h], centers[h]).all()
        if h:  # and not (all) of another head's centers: the codebook really is per head
            assert not torch.isin(deq[:, h], centers[0]).all()
    fq = cb.fake_quantize(x, centers, bounds, dim=1)
    assert fq.dtype == x.dtype
    assert torch.equal(fq, deq.to(x.dtype))
    # idempotent: quantizing a reconstruction gives it back
    assert torch.equal(cb.fake_quantize(fq, centers, bounds, dim=1), fq)
    assert torch.equal(cb.quantize(deq, bounds, dim=1), codes)


def test_quantize_other_dims_match() -> None:
    books = _head_codebooks(8)
    centers, bounds = _stack(books)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, len(books), generator=g, dtype=torch.float64)
    a = cb.fake_quantize(x, centers, bounds, dim=-1)
    b = cb.fake_quantize(x.movedim(-1, 1), centers, bounds, dim=1).movedim(1, -1)
    assert torch.equal(a, b)
    for h, book in enumerate(books):
        np.testing.assert_array_equal(a[..., h].numpy(), book(x[..., h].numpy()))


def test_idempotent_for_lambda_lloyd_codebooks_with_centers_in_their_cells() -> None:
    # pair-aware boundaries are not midpoints; quantize/dequantize still follows them
    books = [*pcb.gaussian_pair_codebooks("lambda-lloyd", 2, 2, rho=0.8), pcb.gaussian_pair_codebooks("lambda", 2, 2)[0]]
    assert not np.allclose(books[0].boundaries, 0.5 * (books[0].centers[1:] + books[0].centers[:-1]))
    centers, bounds = _stack(books)
    x = torch.linspace(-4, 4, 2001, dtype=torch.float64).expand(len(books), -1)
    codes = cb.quantize(x, bounds, dim=0)
    for h, book in enumerate(books):
        np.testing.assert_array_equal(codes[h].numpy(), book.encode(x[h].numpy()))
        assert np.array_equal(book.encode(book.centers), np.arange(book.levels))
    fq = cb.fake_quantize(x, centers, bounds, dim=0)
    assert torch.equal(cb.fake_quantize(fq, centers, bounds, dim=0), fq)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite(bad: float) -> None:
    centers, bounds = _stack(_head_codebooks(4))
    x = torch.zeros(1, len(centers), 3, 2)
    x[0, 2, 1, 0] = bad
    with pytest.raises(ValueError):
        cb.quantize(x, bounds, dim=1)
    with pytest.raises(ValueError):
        cb.fake_quantize(x, centers, bounds, dim=1)


def test_quantize_rejects_wrong_boundaries_shape() -> None:
    centers, bounds = _stack(_head_codebooks(4))
    heads = len(centers)
    x = torch.zeros(2, heads, 3, 2)
    with pytest.raises(ValueError, match="boundaries"):
        cb.quantize(x, bounds[:-1], dim=1)  # H - 1 codebooks
    with pytest.raises(ValueError, match="boundaries"):
        cb.quantize(x, bounds[0], dim=1)  # 1-D
    with pytest.raises(ValueError, match="boundaries"):
        cb.quantize(x, bounds[None], dim=1)  # 3-D
    with pytest.raises(ValueError, match="boundaries"):
        cb.quantize(x, bounds, dim=2)  # wrong dim
    with pytest.raises(ValueError):
        cb.quantize(x, torch.zeros(heads, 256, dtype=torch.float64), dim=1)  # 257 levels
    codes = cb.quantize(x, bounds, dim=1)
    with pytest.raises(ValueError, match="centers"):
        cb.dequantize(codes, centers[:-1], dim=1)
    with pytest.raises(ValueError, match="centers"):
        cb.dequantize(codes, centers[0], dim=1)


def test_quantize_value_on_a_boundary_goes_up() -> None:
    # code = #{boundaries <= x}, as Codebook.encode
    books = [cb.Codebook.nearest(np.array([-1.0, 0.0, 2.0])), cb.Codebook.nearest(np.array([0.0, 1.0, 3.0]))]
    centers, bounds = _stack(books)
    x = torch.tensor([[-0.5, 1.0, -0.6, 3.0], [0.5, 2.0, 0.4, -9.0]], dtype=torch.float64)
    codes = cb.quantize(x, bounds, dim=0)
    assert codes.tolist() == [[1, 2, 0, 2], [1, 2, 0, 0]]
    for h, book in enumerate(books):
        np.testing.assert_array_equal(codes[h].numpy(), book.encode(x[h].numpy()))


def test_quantize_256_levels_uses_full_uint8_range() -> None:
    book = cb.compand(d.lambda_star_density(0.0), 256)
    centers, bounds = _stack([book])
    x = torch.tensor([[-100.0, 100.0, 0.0]], dtype=torch.float64)
    codes = cb.quantize(x, bounds, dim=0)
    assert codes.tolist() == [[0, 255, book.encode(np.array([0.0]))[0]]]
    assert cb.dequantize(codes, centers, dim=0)[0, 1].item() == book.centers[-1]


# =========================================================================== Lloyd–Max and λ at ρ = 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloydmax_reaches_max_mse(bits: int) -> None:
    book = pcb.gaussian_pair_codebooks("lloydmax", bits, bits)[0]
    assert book.levels == 2**bits
    np.testing.assert_allclose(book.boundaries, 0.5 * (book.centers[1:] + book.centers[:-1]), atol=1e-12)
    assert _gaussian_mse(book) == pytest.approx(MAX_MSE[bits], rel=0.01)
    # and beats the companded Panter–Dite codebook on plain MSE
    assert _gaussian_mse(book) < _gaussian_mse(pcb.gaussian_pair_codebooks("lambda", bits, bits)[0])


def test_lloydmax_satisfies_centroid_condition_and_symmetry() -> None:
    for bits in (1, 2, 3, 4):
        book = pcb.gaussian_pair_codebooks("lloydmax", bits, bits)[0]
        p, m1, _ = _gaussian_cells(book)
        np.testing.assert_allclose(book.centers, m1 / p, atol=2e-4)
        np.testing.assert_allclose(book.centers, -book.centers[::-1], atol=1e-4)
    # Max (1960), 8 levels: ±0.2451, ±0.7560, ±1.3440, ±2.1520
    c3 = pcb.gaussian_pair_codebooks("lloydmax", 3, 3)[0].centers
    np.testing.assert_allclose(c3[4:], [0.2451, 0.7560, 1.3440, 2.1520], atol=1e-3)


def test_lambda_approaches_lloydmax_as_bits_grow() -> None:
    model = pcb.GaussianPair(0.0)
    max_diff, inner_diff, ratio = [], [], []
    for bits in (3, 5, 7):
        lam = pcb.gaussian_pair_codebooks("lambda", bits, bits, rho=0.0)
        lm = pcb.gaussian_pair_codebooks("lloydmax", bits, bits, rho=0.0)
        diff = np.abs(lam[0].centers - lm[0].centers)
        inner = np.abs(lm[0].centers) <= 2.0
        max_diff.append(diff.max())
        inner_diff.append(diff[inner].max())
        ratio.append(model.pair_error(*lam) / model.pair_error(*lm))
    # absolute (σ units): the whole codebook, and much faster inside ±2σ
    assert max_diff[0] > max_diff[1] > max_diff[2]
    assert inner_diff[0] > 2 * inner_diff[1] > 8 * inner_diff[2]
    assert inner_diff[2] < 0.025
    # error ratio λ / Lloyd–Max decreases to 1
    assert ratio[0] > ratio[1] > ratio[2] >= 1.0 - 1e-3
    assert ratio[2] < 1.02


# =========================================================================== high-resolution prediction


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_8bit_error_matches_high_resolution_prediction(rho: float) -> None:
    bx, by = pcb.gaussian_pair_codebooks("lambda", 8, 8, rho=rho)
    predicted = d.gaussian_pair_hr_error(rho, 256, 256)
    quad = pcb.GaussianPair(rho).pair_error(bx, by)
    assert quad == pytest.approx(predicted, rel=0.10)
    x, y = _gauss_pairs(400_000, rho, seed=8)
    mc = pcb.sample_pair_error(bx, by, x, y)
    assert mc == pytest.approx(predicted, rel=0.10)


def test_product_second_moment_and_pair_error_match_monte_carlo_with_means() -> None:
    rho, mx, my = 0.5, 1.0, -2.0
    model = pcb.GaussianPair(rho, mx, my)
    # Isserlis with means: a²b² + a² + b² + 4abρ + 1 + 2ρ²
    assert model.product_second_moment() == pytest.approx(4 + 1 + 4 - 4 + 1.5)
    u, v = _gauss_pairs(400_000, rho, seed=3)
    x, y = mx + u, my + v
    assert np.mean((x * y) ** 2) == pytest.approx(model.product_second_moment(), rel=0.02)
    bx, by = pcb.gaussian_pair_codebooks("lambda", 3, 3, rho, mx, my)
    bx, by = _uncentered(bx, mx), _uncentered(by, my)
    assert model.pair_error(bx, by) == pytest.approx(pcb.sample_pair_error(bx, by, x, y), rel=0.03)
    # the quadrature is converged at the default resolution
    assert model.pair_error(bx, by) == pytest.approx(model.pair_error(bx, by, points=40_001), rel=1e-3)


# =========================================================================== reference figures (docs/theory.md §6)


def test_reference_figures_4bit_rho_08() -> None:
    model = pcb.GaussianPair(0.8)
    lam = model.pair_error(*pcb.gaussian_pair_codebooks("lambda", 4, 4, rho=0.8))
    pair_lloyd = model.pair_error(*pcb.gaussian_pair_codebooks("lambda-lloyd", 4, 4, rho=0.8))
    lloydmax = model.pair_error(*pcb.gaussian_pair_codebooks("lloydmax", 4, 4, rho=0.8))
    assert lam == pytest.approx(0.0146, rel=0.05)
    assert pair_lloyd <= 0.0146
    assert pair_lloyd <= lam
    # the point of λ*: at ρ = 0.8 it beats the marginal Lloyd–Max codebook clearly
    assert lam < 0.8 * lloydmax


def test_reference_figures_4bit_rho_0() -> None:
    model = pcb.GaussianPair(0.0)
    assert model.pair_error(*pcb.gaussian_pair_codebooks("lloydmax", 4, 4)) == pytest.approx(0.0189, rel=0.03)
    assert model.pair_error(*pcb.gaussian_pair_codebooks("lambda", 4, 4)) == pytest.approx(0.0203, rel=0.03)


def test_reference_figures_2bit_rho_08() -> None:
    model = pcb.GaussianPair(0.8)
    pair_lloyd = model.pair_error(*pcb.gaussian_pair_codebooks("lambda-lloyd", 2, 2, rho=0.8))
    lam = model.pair_error(*pcb.gaussian_pair_codebooks("lambda", 2, 2, rho=0.8))
    assert pair_lloyd <= 0.21
    assert lam == pytest.approx(0.249, rel=0.05)
    assert pair_lloyd < 0.9 * lam


def test_unequal_bits() -> None:
    bx, by = pcb.gaussian_pair_codebooks("lambda-lloyd", 2, 4, rho=0.7)
    assert bx.levels == 4 and by.levels == 16
    assert bx.boundaries.shape == (3,) and by.boundaries.shape == (15,)
    model = pcb.GaussianPair(0.7)
    lam = pcb.gaussian_pair_codebooks("lambda", 2, 4, rho=0.7)
    assert lam[0].levels == 4 and lam[1].levels == 16
    err = model.pair_error(bx, by)
    assert err <= model.pair_error(*lam)
    # more bits on one side helps: (2, 4) beats (2, 2)
    assert err < model.pair_error(*pcb.gaussian_pair_codebooks("lambda-lloyd", 2, 2, rho=0.7))


def test_uniform_clip_is_optimal() -> None:
    model = pcb.GaussianPair(0.0)
    bx, by = pcb.gaussian_pair_codebooks("uniform", 3, 3)
    np.testing.assert_allclose(np.diff(bx.centers), np.diff(bx.centers)[0], rtol=1e-9)
    np.testing.assert_allclose(bx.centers, -bx.centers[::-1], atol=1e-12)
    best = model.pair_error(bx, by)
    for scale in (0.95, 1.05):
        wider = cb.Codebook.nearest(bx.centers * scale), cb.Codebook.nearest(by.centers * scale)
        assert model.pair_error(*wider) > best
    # uniform loses to Lloyd–Max at ρ = 0
    assert best > model.pair_error(*pcb.gaussian_pair_codebooks("lloydmax", 3, 3))


# =========================================================================== means


def test_partner_mean_makes_centers_asymmetric() -> None:
    cx = pcb.gaussian_pair_codebooks("lambda", 4, 4, rho=0.3, mean_x=0.0, mean_y=2.0)[0].centers
    assert np.max(np.abs(cx + cx[::-1])) > 0.05  # not mirror images
    assert cx.mean() > 0.05  # λ_X leans to where (m_Y + ρu)² is large
    c0 = pcb.gaussian_pair_codebooks("lambda", 4, 4, rho=0.3, mean_x=0.0, mean_y=0.0)[0].centers
    np.testing.assert_allclose(c0, -c0[::-1], atol=1e-9)
    # X's own mean only shifts (centered units: no change); the partner's mean reshapes
    shifted = pcb.gaussian_pair_codebooks("lambda", 4, 4, rho=0.3, mean_x=1.5, mean_y=2.0)[0].centers
    np.testing.assert_allclose(shifted, cx, atol=1e-12)
    np.testing.assert_allclose(pcb.gaussian_centers("lambda", 4, rho=0.3, mean=2.0), cx, atol=1e-12)
    # mirror: m_Y → −m_Y mirrors X's codebook
    cneg = pcb.gaussian_pair_codebooks("lambda", 4, 4, rho=0.3, mean_y=-2.0)[0].centers
    np.testing.assert_allclose(cneg, -cx[::-1], atol=1e-9)


# =========================================================================== from samples


def test_sample_codebooks_match_gaussian_model() -> None:
    rho, mx, my, sx, sy = 0.6, 1.0, -0.5, 2.0, 0.5
    u, v = _gauss_pairs(200_000, rho, seed=11)
    x, y = sx * (mx + u), sy * (my + v)
    bx, by = pcb.sample_pair_codebooks("lambda", 3, 3, x, y)
    mbx, mby = pcb.gaussian_pair_codebooks("lambda", 3, 3, rho, mx, my)
    # samples' units, uncentered: sx * (m_x + c)
    np.testing.assert_allclose(bx.centers, sx * (mx + mbx.centers), atol=0.03 * sx)
    np.testing.assert_allclose(by.centers, sy * (my + mby.centers), atol=0.03 * sy)


def test_sample_pair_error_weights() -> None:
    x, y = _gauss_pairs(1000, 0.5, seed=5)
    bx, by = pcb.gaussian_pair_codebooks("lloydmax", 2, 2)
    base = pcb.sample_pair_error(bx, by, x, y)
    assert base > 0
    assert pcb.sample_pair_error(bx, by, x, y, np.full_like(x, 3.0)) == pytest.approx(base, rel=1e-12)
    w = np.arange(len(x)) % 3
    rep = np.repeat(np.arange(len(x)), w)
    assert pcb.sample_pair_error(bx, by, x, y, w.astype(float)) == pytest.approx(
        pcb.sample_pair_error(bx, by, x[rep], y[rep]), rel=1e-12
    )


def test_pair_lloyd_samples_validates() -> None:
    bx, by = pcb.gaussian_pair_codebooks("lambda", 2, 2)
    with pytest.raises(ValueError):
        pcb.pair_lloyd_samples(bx, by, np.zeros(10), np.zeros(11))
    with pytest.raises(ValueError):
        pcb.pair_lloyd_samples(bx, by, np.zeros(0), np.zeros(0))


@pytest.mark.parametrize("bits_x,bits_y", [(2, 2), (3, 3), (4, 4), (2, 4)])
@pytest.mark.parametrize("kind", ["gauss-0.0", "gauss-0.8", "student-t"])
def test_sample_lambda_lloyd_never_worse_than_lambda(kind: str, bits_x: int, bits_y: int) -> None:
    if kind == "student-t":
        x, y = _student_t_pairs(40_000, 0.6, dof=4.0, seed=bits_x * 10 + bits_y)
    else:
        x, y = _gauss_pairs(40_000, float(kind.split("-")[1]), seed=bits_x * 10 + bits_y)
    lam = pcb.sample_pair_codebooks("lambda", bits_x, bits_y, x, y)
    ll = pcb.sample_pair_codebooks("lambda-lloyd", bits_x, bits_y, x, y)
    assert ll[0].levels == 2**bits_x and ll[1].levels == 2**bits_y
    e_lam, e_ll = pcb.sample_pair_error(*lam, x, y), pcb.sample_pair_error(*ll, x, y)
    assert e_ll <= e_lam * (1 + 1e-12)


@pytest.mark.parametrize("kind", ["gauss", "student-t"])
def test_pair_lloyd_samples_never_worse_than_start(kind: str) -> None:
    if kind == "student-t":
        x, y = _student_t_pairs(20_000, 0.3, dof=3.0, seed=2)
    else:
        x, y = _gauss_pairs(20_000, 0.7, seed=2)
    for start in (pcb.gaussian_pair_codebooks("lloydmax", 3, 3), pcb.gaussian_pair_codebooks("uniform", 3, 3)):
        out = pcb.pair_lloyd_samples(*start, x, y)
        assert pcb.sample_pair_error(*out, x, y) <= pcb.sample_pair_error(*start, x, y) * (1 + 1e-12)


def test_sample_lambda_lloyd_improves_on_gaussian_samples() -> None:
    rho = 0.8
    x, y = _gauss_pairs(40_000, rho, seed=0)
    e_lam = pcb.sample_pair_error(*pcb.sample_pair_codebooks("lambda", 2, 2, x, y), x, y)
    e_ll = pcb.sample_pair_error(*pcb.sample_pair_codebooks("lambda-lloyd", 2, 2, x, y), x, y)
    # the model's pair-Lloyd codebooks exist and reach ≈0.19 on these very samples
    e_model = pcb.sample_pair_error(*pcb.gaussian_pair_codebooks("lambda-lloyd", 2, 2, rho=rho), x, y)
    assert e_model < 0.21
    assert e_ll <= 1.05 * e_model
    assert e_ll < 0.9 * e_lam
