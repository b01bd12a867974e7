"""Exploratory: causal query rules screened on the development windows (held-out windows 5–6,
bf16, simulated path: keys as the default cache serves them, block-causal; values exact), by
perplexity and KL divergence from fp. Each rule quantizes a query from its own token and earlier
ones only, at B bits (the first token exact):

``static``    static per-channel (μ, σ) and the head's pair codebook (``Codebooks.causal_queries(norm="channel")``);
``rms``       the same over a per-token RMS of (x − μ)/σ; ``guard``: a per-token scale only where a
              token would pass the outermost center; ``rmsguard`` both;
``absmax``    the token's largest |(x − μ)/σ| onto the outermost center (``norm="channel-token"``, kept);
``absmaxg``   the same onto [−1, 1] through the file's group-histogram codebook;
``prev``      min–max per channel of the previous group of 64 queries (the first group static);
``running``   min–max per channel over all earlier complete groups; ``runguard`` with a per-token guard;
``lookahead`` the file's own group-normalised queries (not causal: the reference).

Usage:  python eval/research/query_rules.py 4 static,rms,guard,rmsguard,absmax,absmaxg,prev,running,runguard,lookahead
(run from the repository root, with out/default.safetensors from the main job). Prints a table.
"""
import sys, time, json, torch
from kvquant.io.assets import load_model
from kvquant.codebooks import Codebooks
from kvquant.io.data import held_out_windows, load_text
from kvquant.evaluation.diagnostics import KeysOnly, QueryKeyPair
from kvquant.evaluation.perplexity import evaluate, format_table
from kvquant.core import scalar as cb

torch.set_num_threads(2)
bits_list = [int(b) for b in sys.argv[1].split(",")] if len(sys.argv) > 1 else [4]
books = Codebooks.load("out/default.safetensors")  # the main job's file
model, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
text = load_text("enwiki-excerpt", split="test")
w = held_out_windows(tok, text, 2048, 6, books.calibration)
dev = w.ids[4:6]
G = 64

class Rule:
    rope = "pre"
    def __init__(self, mode, b):
        self.mode, self.b = mode, b
        self.cq = books.causal_queries(b, norm="channel").q  # its tables; the rules below apply them
        self.gq = books.rebuilt(bits_q=b, bits_k=b, budget=0.0, budget_sides="qk").q  # look-ahead group books
    def effective_bits(self, head_dim=None, seqlen=None):
        return self.b
    def __call__(self, x, layer, side):
        if self.mode == "lookahead":
            return self.gq.apply(x, layer)
        s = self.cq
        xf = x.float()
        off, sc = s.offset[layer][None, :, None, :], s.scale[layer][None, :, None, :]
        cen, bnd = s.centers[layer], s.boundaries[layer]
        xn = (xf - off) / sc
        cmax = cen.abs().amax(-1)[None, :, None, None]  # (1,H,1,1)
        if self.mode == "absmaxg":
            r = xn.abs().amax(-1, keepdim=True).clamp_min(1e-6).half().float()
            gc, gb = self.gq.centers[layer], self.gq.boundaries[layer]
            out = cb.fake_quantize(xn / r, gc, gb, dim=1) * r * sc + off
        elif self.mode in ("static", "rms", "guard", "rmsguard", "absmax"):
            r = torch.ones_like(xn[..., :1])
            if self.mode in ("rms", "rmsguard"):
                r = xn.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
            if self.mode == "absmax":
                r = xn.abs().amax(-1, keepdim=True) / cmax
            if self.mode in ("guard", "rmsguard"):
                r = torch.maximum(r, xn.abs().amax(-1, keepdim=True) / cmax)
            r = r.half().float()
            out = cb.fake_quantize(xn / r, cen, bnd, dim=1) * r * sc + off
        else:  # prev / running: min-max per channel from earlier groups; the first group static
            B, H, T, D = xf.shape
            m = T // G
            xs = xf.clone()
            xs[:, :, 0] = xf[:, :, 1]  # the sink (token 0) left out of the ranges
            xg = xs[:, :, : m * G].reshape(B, H, m, G, D)
            lo, hi = xg.amin(3), xg.amax(3)
            if self.mode in ("running", "runguard"):
                lo, hi = lo.cummin(2).values, hi.cummax(2).values
            lo, hi = torch.cat([lo[:, :, :1], lo[:, :, :-1]], 2), torch.cat([hi[:, :, :1], hi[:, :, :-1]], 2)
            idx = torch.arange(T) // G
            idx = idx.clamp_max(m - 1)
            mid = ((hi + lo) / 2)[:, :, idx]; half = ((hi - lo) / 2).clamp_min(1e-6)[:, :, idx]
            gc, gb = self.gq.centers[layer], self.gq.boundaries[layer]
            u = (xf - mid) / half
            r = u.abs().amax(-1, keepdim=True).clamp_min(1.0).half().float() if self.mode == "runguard" else 1.0
            out = cb.fake_quantize((u / r).clamp(-1, 1), gc, gb, dim=1) * r * half + mid
            stat = cb.fake_quantize(xn, cen, bnd, dim=1) * sc + off
            first = (torch.arange(T) < G)[None, None, :, None]
            out = torch.where(first, stat, out)
        out[:, :, :1] = xf[:, :, :1]  # first token exact (the sink)
        return out.to(x.dtype)

keys = KeysOnly(books)
rows = {"fp": None, "keys only": keys}
for b in bits_list:
    for mode in sys.argv[2].split(",") if len(sys.argv) > 2 else ["static", "rms", "guard", "rmsguard", "prev", "running", "lookahead"]:
        rows[f"{mode}@{b}"] = QueryKeyPair(Rule(mode, b), books)
t0 = time.time()
res = evaluate(model, dev, rows)
print(format_table(res))
print("seconds", time.time() - t0)
