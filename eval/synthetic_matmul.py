"""Synthetic benchmark: scalar quantizers for the factors of a product, on correlated Gaussians.

For every ρ, bits and codebook method (both factors quantized with the same bits):

(a) pair error ``E[(XY − X̂Ŷ)²] / E[(XY)²]`` of the pair model, by quadrature (exact for the
    model up to grid resolution; ``GaussianPair.pair_error`` with ≥ 128 nodes per cell),
(b) full products: ``‖AB − ÂB̂‖_F / ‖AB‖_F`` for A (128×256), B (256×128), averaged over
    draws. Entries share a per-channel component so that every multiplying pair
    ``(A[t,j], B[j,s])`` is N(0,1)×N(0,1) with correlation ρ, as in the pair model,
(c) at ρ = 0, the ratio of (a) to the limit ``Γ(R) = 2·2^{−2R} − 2^{−4R}`` (seed 001),
(d) the high-resolution prediction for λ* codebooks, ``density.gaussian_pair_hr_error``.

Usage:  python eval/synthetic_matmul.py [--quick] [--json out/synthetic.json]
Writes the table into BENCHMARKS.md (section ``synthetic``) and the rows to JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvquant.core import density as dens
from kvquant.core import pair_codebooks as pcb
from kvquant.core import scalar as cb
from kvquant.io.fileio import replace_section, write_text

ROOT = Path(__file__).resolve().parents[1]
RHOS = (0.0, 0.3, 0.5, dens.RHO_CRITICAL, 0.8, 0.95)
BITS = (2, 3, 4, 6, 8)


def limit_gamma(rate: float) -> float:
    """Γ(R) = 2·2^{−2R} − 2^{−4R}: least MSE per entry of AᵀB / n for iid N(0,1) (R ≳ 0.906)."""
    return 2.0 * 2.0 ** (-2 * rate) - 2.0 ** (-4 * rate)


def correlated_factors(rng: np.random.Generator, rho: float, m: int = 128, n: int = 256, p: int = 128):
    """A (m×n), B (n×p) with every pair (A[t,j], B[j,s]) standard normal, correlation ρ."""
    a = math.sqrt(abs(rho))
    z = rng.standard_normal(n)
    A = a * z[None, :] + math.sqrt(1 - abs(rho)) * rng.standard_normal((m, n))
    B = math.copysign(a, rho) * z[:, None] + math.sqrt(1 - abs(rho)) * rng.standard_normal((n, p))
    return A, B


def matmul_error(rng, rho, book_a: cb.Codebook, book_b: cb.Codebook, draws: int) -> float:
    errs = []
    for _ in range(draws):
        A, B = correlated_factors(rng, rho)
        C = A @ B
        errs.append(np.linalg.norm(C - book_a(A) @ book_b(B)) / np.linalg.norm(C))
    return float(np.mean(errs))


def run(rhos, bits_list, draws: int, seed: int = 0) -> list[dict]:
    rows = []
    grid = [(r, b, m) for r in rhos for b in bits_list for m in cb.METHODS]
    for rho, bits, method in tqdm(grid, desc="synthetic", unit="codebook"):
        t0 = time.perf_counter()
        bx, by = pcb.gaussian_pair_codebooks(method, bits, bits, rho)
        build_s = time.perf_counter() - t0
        model = pcb.GaussianPair(rho)
        pair = model.pair_error(bx, by, points=max(20_001, 128 * bx.levels + 1))
        rng = np.random.default_rng(seed)  # same draws for every method
        rows.append(
            dict(
                rho=rho,
                bits=bits,
                method=method,
                pair_error=pair,
                matmul_rel_fro=matmul_error(rng, rho, bx, by, draws),
                hr_prediction_lambda=dens.gaussian_pair_hr_error(rho, bx.levels, by.levels),
                ratio_to_limit=pair / limit_gamma(bits) if rho == 0.0 else None,
                build_seconds=build_s,
            )
        )
    return rows


def markdown(rows: list[dict], command: str, draws: int) -> str:
    lines = [
        "## Synthetic pair model (correlated Gaussians, both factors quantized)",
        "",
        f"Command: `{command}` — float64, {draws} draws of A 128×256 · B 256×128 per cell.",
        "Pair error = E[(XY−X̂Ŷ)²]/E[(XY)²] by quadrature; matmul = mean ‖AB−ÂB̂‖_F/‖AB‖_F;",
        "HR = high-resolution prediction for λ*; Γ-ratio = pair error / Γ(R) at ρ = 0 (seed 001);",
        "*best* marks the lowest pair error in the row; lambda-lloyd's gap to it is in the last column.",
        "",
        "| ρ | bits | " + " | ".join(f"{m} pair" for m in cb.METHODS) + " | "
        + " | ".join(f"{m} matmul" for m in cb.METHODS) + " | HR(λ*) | Γ-ratio (lloydmax / lambda-lloyd) | λ-lloyd vs best |",
        "|" + "---|" * (2 + 2 * len(cb.METHODS) + 3),
    ]
    keys = sorted({(r["rho"], r["bits"]) for r in rows})
    for rho, bits in keys:
        cell = {r["method"]: r for r in rows if r["rho"] == rho and r["bits"] == bits}
        best = min(cell[m]["pair_error"] for m in cell)
        pair = [f"**{cell[m]['pair_error']:.4g}**" if cell[m]["pair_error"] == best else f"{cell[m]['pair_error']:.4g}" for m in cb.METHODS]
        mm = [f"{cell[m]['matmul_rel_fro']:.4g}" for m in cb.METHODS]
        gamma = (
            f"{cell['lloydmax']['ratio_to_limit']:.2f} / {cell['lambda-lloyd']['ratio_to_limit']:.2f}"
            if rho == 0.0 else "–"
        )
        gap = cell["lambda-lloyd"]["pair_error"] / best - 1
        lines.append(
            f"| {rho:.3f} | {bits} | " + " | ".join(pair) + " | " + " | ".join(mm)
            + f" | {cell['lambda']['hr_prediction_lambda']:.4g} | {gamma} | {gap:+.2%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ρ ∈ {0, 0.8, 0.95}, bits ∈ {2, 4}, 20 draws (< 1 min)")
    ap.add_argument("--draws", type=int, default=None, help="matrix draws per cell (default 100; 20 with --quick)")
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "synthetic_matmul.json")
    ap.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    rhos, bits = ((0.0, 0.8, 0.95), (2, 4)) if args.quick else (RHOS, BITS)
    draws = args.draws or (20 if args.quick else 100)
    rows = run(rhos, bits, draws)
    command = "python eval/synthetic_matmul.py" + (" --quick" if args.quick else "")
    write_text(args.json, json.dumps({"command": command, "draws": draws, "rows": rows}, indent=1))
    table = markdown(rows, command, draws)
    print(table)
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", "synthetic", table)


if __name__ == "__main__":
    sys.exit(main())
