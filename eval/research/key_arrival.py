"""Exploratory: keys quantized **on arrival**, with the previous group's per-channel range, against
the deployed cache's block-causal keys (a key read exact until its group of G is complete).

Why: the newest incomplete group is what keeps the mean K/V bits held above the end-of-window
value (BENCHMARKS "The newest group": INT8 keys and values of up to G − 1 tokens). A key quantized
as it arrives, with a range it already knows — the (mid, half) of the previous group of G keys,
per channel, stored in 8 bits and widened by a factor w — needs no exact or INT8 tail at all:
what a cache would hold is codes from the first group on. Entries outside the range go to the
outermost centers. The first group (no previous range) stays exact here; a cache would hold it
as today's INT8 tail.

Rows (development windows 5–6, simulated path, one forward per window, keys only: queries and
values exact, the sink exact; the file's own tables, K 3.65 effective bits):

``block-causal``   the deployed cache's keys (``KeysOnly(books)``: each key read quantized from the
                   query that completes its group on; the newest group exact);
``own, arrival``   the same codes read by every query from the key's own position on (look-ahead
                   ranges: not causal; isolates what reading the newest keys quantized costs);
``prev×w``         each group quantized with the previous group's range widened by w, read from
                   its arrival on (causal).

Usage:  python eval/research/key_arrival.py [--dtype float32] [--widen 1,1.25,1.5]
(from the repository root, with out/default.safetensors from the main job). Prints a table.
"""
from __future__ import annotations

import argparse
import time

import torch

from kvquant.codebooks import Codebooks
from kvquant.codebooks.sides import fake_quantize_rows
from kvquant.core.groupnorm import code_scales, group_range
from kvquant.evaluation.diagnostics import KeysOnly
from kvquant.evaluation.perplexity import evaluate, format_table
from kvquant.io.assets import load_model
from kvquant.io.data import held_out_windows, load_text


class PreviousRangeKeys:
    """Keys (B, H, T, D), pre-RoPE, quantized with the previous group's per-channel (mid, half)
    × ``widen`` (8-bit scales) through the file's key tables; group 0 (and so the sink) exact."""

    rope = "pre"
    key_group = 0  # read quantized from arrival on

    def __init__(self, books: Codebooks, widen: float):
        self.books, self.side, self.widen = books, books.k, widen

    def effective_bits(self, head_dim=None, seqlen=None) -> float:
        return self.books.effective_bits(head_dim=head_dim, seqlen=seqlen)

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        g = self.side.group
        b, h, t, d = x.shape
        if t <= g:
            return x
        xs = x.float().clone()
        xs[:, :, 0] = xs[:, :, 1]  # the sink left out of group 0's range
        xg, mid, half = group_range(xs, g)  # (B, H, n, G, D), (B, H, n, 1, D)
        mid, half = code_scales(mid, half * self.widen)
        mid = torch.cat([mid[:, :, :1], mid[:, :, :-1]], 2)  # group i uses group i − 1's range
        half = torch.cat([half[:, :, :1], half[:, :, :-1]], 2).clamp_min(1e-12)
        u = ((xg - mid) / half).reshape(b, h, -1, d)
        tab = self.side.centers[layer], self.side.boundaries[layer]
        out = (fake_quantize_rows(u, tab[0], tab[1]).reshape(xg.shape) * half + mid).reshape(b, h, -1, d)[:, :, :t]
        out[:, :, :g] = x[:, :, :g].float()
        return out.to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--widen", default="1,1.25,1.5")
    args = ap.parse_args()
    books = Codebooks.load("out/default.safetensors")
    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    dev = held_out_windows(tok, load_text("enwiki-excerpt", split="test"), 2048, 6, books.calibration).ids[4:6]
    rows = {"fp": None, "block-causal": KeysOnly(books), "own, arrival": KeysOnly(books, key_group=0)}
    rows |= {f"prev×{w}": KeysOnly(PreviousRangeKeys(books, float(w))) for w in args.widen.split(",")}
    t0 = time.time()
    res = evaluate(model, dev, rows)
    print(f"smollm2-135m · enwiki-excerpt · development windows 5–6 × 2048 · {args.dtype} · simulated, keys only "
          f"(queries and values exact) · out/default.safetensors ({time.time() - t0:.0f} s)")
    print(format_table(res))


if __name__ == "__main__":
    main()
