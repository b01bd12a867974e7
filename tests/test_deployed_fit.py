"""eval/deployed.py's fit of the key bits to a target of mean K/V bits held."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from deployed import fit_key_bits  # noqa: E402


def _line(lowest: float = 1.0):
    """A mean that rises 0.5 per key bit and a floor below which the codebooks refuse (ValueError)."""
    calls = []

    def mean_bits(k: float, v: int) -> float:
        calls.append(k)
        if k < lowest - 1e-9:
            raise ValueError("below the fewest code bits")
        return 0.5 * (k + v) + 0.45 + (0.02 if k > 2.6 else 0.0)  # a small step: not exactly linear

    return mean_bits, calls


@pytest.mark.parametrize("target,v,expect", [(4.0, 4, 3.05), (4.0, 3, 4.05), (3.0, 2, 3.05), (3.0, 1, 4.05)])
def test_the_largest_key_bits_on_the_grid_that_hold_the_target(target, v, expect):
    mean_bits, calls = _line()
    k, m = fit_key_bits(mean_bits, target, v, start=2 * target - v - 0.35)
    assert k == pytest.approx(expect)
    assert m <= target < mean_bits(round(k + 0.05, 2), v)
    assert len(set(calls)) <= 8  # a secant step, then a few single steps


def test_no_fit_where_even_the_fewest_key_bits_hold_more():
    mean_bits, _ = _line(lowest=1.3)
    assert fit_key_bits(mean_bits, 2.0, 2, start=1.65) == (None, None)


def test_a_secant_below_the_floor_steps_back_up():
    mean_bits, _ = _line(lowest=1.3)
    k, m = fit_key_bits(mean_bits, 1.61, 1, start=2.0)  # 0.5(k + 1) + 0.45 <= 1.61 -> k <= 1.32
    assert (k, round(m, 6)) == (1.3, 1.6)


def test_steps_up_where_the_secant_lands_low():
    def mean_bits(k: float, v: int) -> float:  # concave: the secant from below undershoots
        return k if k < 3 else 3 + 0.2 * (k - 3)

    k, m = fit_key_bits(mean_bits, 3.5, 4, start=2.5)
    assert k == pytest.approx(5.5) and m <= 3.5
