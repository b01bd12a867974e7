"""Pre-RoPE vs post-RoPE quantization of queries and keys (issue 5, item 3).

RoPE rotates channel pair (j, j + D/2) of the token at position p by angle p·θ_j. Post-RoPE
(what kvquant does) quantizes the rotated entries; pre-RoPE undoes the rotation inside the
attention call, quantizes, and rotates back:

    x_pre = x·cos − rotate_half(x)·sin,   x̂ = Q(x_pre)·cos + rotate_half(Q(x_pre))·sin

with cos/sin from the model's own rotary embedding. A channel's pre-RoPE values do not spin with
the position, so its range over a group of tokens is narrower (the outlier channels of keys are
stable there, KVQuant's observation).

Scope: this experiment serves the perplexity protocol, where every window is one forward pass
from position 0 without a cache, so the positions of the T tokens a quantizer sees are 0…T−1.
Llama-style rotary (SmolLM2) only. Calibration histograms for the dynamic normalisation are
captured on the derotated q and k (the pair weights E[partner²] per channel are then taken in
the derotated frame — an approximation, the rotation mixes channels j and j + D/2).

Rows (bits 4, 3, 2): INT per channel (G=128) and the channel-group codebooks with the first
token exact (uniform, lambda, lambda-lloyd), each post- and pre-RoPE.

Usage:  python eval/prerope.py [--seqlen 2048] [--calib 8] [--windows 4] [--bits 4,3,2]
Writes out/prerope_smollm2.json and the ``prerope-smollm2`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import rotate_half

from kvquant.assets import load_model
from kvquant.baselines import Baseline
from kvquant.calibrate import run_capture
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.data import load_text, split_calib_eval
from kvquant.fileio import replace_section, write_text
from kvquant.fingerprint import ModelFingerprint
from kvquant.groupnorm import GroupHistogram
from kvquant.perplexity import evaluate
from kvquant.stats import PairStats

ROOT = Path(__file__).resolve().parents[1]
GROUP, SINK = 128, 1
METHODS = ("uniform", "lambda", "lambda-lloyd")


class Rotary:
    """cos/sin (T, D) of the model's rotary embedding at positions 0…T−1."""

    def __init__(self, model, seqlen: int):
        rot = model.model.rotary_emb
        if getattr(rot, "attention_scaling", 1.0) != 1.0:
            raise ValueError("this experiment assumes rotary attention_scaling = 1")
        x = torch.zeros(1, seqlen, 1)
        cos, sin = rot(x, torch.arange(seqlen)[None])
        self.cos, self.sin = cos[0].float(), sin[0].float()

    def _cs(self, x: torch.Tensor):
        t = x.shape[2]
        if t > self.cos.shape[0]:
            raise ValueError(f"{t} positions, rotary table has {self.cos.shape[0]}")
        return self.cos[:t].to(x.device), self.sin[:t].to(x.device)

    def derotate(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self._cs(x)
        xf = x.float()
        return xf * c - rotate_half(xf) * s

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self._cs(x)
        return x * c + rotate_half(x) * s


class PreRope:
    """Quantizer ``inner`` applied to derotated q/k; same interface as any kvquant quantizer."""

    def __init__(self, inner, rotary: Rotary):
        self.inner, self.rotary = inner, rotary

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        return self.rotary.rotate(self.inner(self.rotary.derotate(x), layer, side)).to(x.dtype)

    def effective_bits(self, **kw) -> float:
        return self.inner.effective_bits(**kw)


def capture_pre(model, calib, rotary: Rotary | None, fp: ModelFingerprint):
    """Pair statistics and the (GROUP, SINK) histogram, in the post- or (rotary given) pre-RoPE frame."""
    stats = PairStats.zeros(fp.num_layers, fp.num_heads, fp.head_dim)
    hist = GroupHistogram.zeros(fp.num_layers, fp.num_heads, fp.num_kv_heads, GROUP, SINK)

    def observe(layer, q, k, mask):
        if rotary is not None:
            q, k = rotary.derotate(q), rotary.derotate(k)
        stats.update(layer, q, k, mask)
        hist.update(layer, q, k, mask)

    run_capture(model, calib, observe, desc="calibrate (pre-RoPE)" if rotary else "calibrate")
    return stats, hist


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--bits", default="4,3,2")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    if model.config.model_type != "llama":
        raise ValueError("pre-RoPE experiment implemented for Llama-style rotary only")
    calib, evals = split_calib_eval(tok, load_text("enwiki-excerpt"), args.seqlen, args.calib, args.windows,
                                    source="enwiki-excerpt")
    fp = ModelFingerprint.from_model(model)
    rotary = Rotary(model, args.seqlen)
    frames = {"post": capture_pre(model, calib, None, fp), "pre": capture_pre(model, calib, rotary, fp)}
    bits_list = [int(b) for b in args.bits.split(",")]
    rows: dict = {"fp": None}
    for b in bits_list:
        for frame, (stats, hist) in frames.items():
            wrap_q = (lambda q: PreRope(q, rotary)) if frame == "pre" else (lambda q: q)
            rows[f"int{b}-channel/{frame}"] = wrap_q(Baseline(f"int{b}-channel"))
            for m in METHODS:
                books = Codebooks.from_stats(stats, CodebookConfig(m, b, b, "channel-group", GROUP, SINK), fp, {}, hist)
                rows[f"{m}@{b}/{frame}"] = wrap_q(books)
    results = evaluate(model, evals, rows)
    command = ("python eval/prerope.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    payload = {"command": command, "model": "smollm2-135m", "dataset": "enwiki-excerpt", "seqlen": args.seqlen,
               "calib_windows": calib.n, "eval_windows": evals.n, "dtype": "float32",
               "seconds": time.perf_counter() - t0, "rows": {k: v.to_dict() for k, v in results.items()}}
    write_text(ROOT / "out" / "prerope_smollm2.json", json.dumps(payload, indent=1))
    md = markdown(payload, bits_list)
    print(md)
    replace_section(ROOT / "BENCHMARKS.md", "prerope-smollm2", md)


def markdown(p: dict, bits_list: list[int]) -> str:
    rows, fp = p["rows"], p["rows"]["fp"]["ppl"]
    cell = lambda r: f"{r['ppl']:.3f} ({r['ppl'] / fp - 1:+.1%})"
    names = [("INT per channel", "int{b}-channel")] + [(f"{m} / chgroup+sink", f"{m}@{{b}}") for m in METHODS]
    out = [
        f"## Pre-RoPE vs post-RoPE quantization (issue 5): {p['model']}, {p['dataset']}, seqlen {p['seqlen']}",
        "",
        (f"Command: `{p['command']}` — {p['eval_windows']} evaluation windows (first of the corpus), "
        f"{p['calib_windows']} calibration windows (last), {p['dtype']}, Q and K both quantized. Unquantized "
        f"perplexity **{fp:.3f}**. `pre`: the rotation is undone inside the attention call, the entries are "
        "quantized, and rotated back (codebooks from pre-RoPE calibration histograms); effective bits are the "
        f"same in both frames (group {GROUP}, first {SINK} token exact for the codebook rows). Cells: ppl (Δ)."),
        "",
        "| quantizer | " + " | ".join(f"{b} bits post-RoPE | {b} bits pre-RoPE" for b in bits_list) + " |",
        "|" + "---|" * (2 * len(bits_list) + 1),
    ]
    for label, key in names:
        cells = []
        for b in bits_list:
            k = key.format(b=b)
            cells += [cell(rows[f"{k}/post"]), cell(rows[f"{k}/pre"])]
        bits = rows[f"{key.format(b=bits_list[0])}/post"]["effective_bits"]
        out.append(f"| {label} [{bits - bits_list[0]:+.3f}b over b] | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
