"""Exploratory: causal queries (``channel-token``) with their code levels allocated over channels.

The ``channel-token`` rule gives every query channel the head's 2^B-level codebook. A query
channel's error reaches the loss through the keys it multiplies, which differ a lot between
channels (the calibration's Fisher weights of the queries spread ~4× between arithmetic and
geometric mean). Here each (layer, query head, channel) gets 2, 3, 4, 5, 8, …, 2^(B+2) levels by
reverse water-filling (:func:`kvquant.core.allocate.water_fill`) of ``½ F_c · ε(n)``:
``F_c`` the file's ``channel_fisher_q``, ``ε(n)`` the head's n-level pair codebook's MSE on a
unit Gaussian; mean code bits B over all query channels, as the uniform rule.
Screened on the development windows (held-out windows 5–6), simulated path (keys as the cache
serves them, block-causal; values exact), by perplexity and KL divergence from fp.

Rules: ``absmax`` the current rule (uniform levels); ``alloc`` allocated levels, per-token scale
mapping the largest |x̃| onto the outermost center of the head's 2^B-level book (channels with
fewer levels clip); ``allocmax`` the same onto the largest outermost center of the head's
channels; ``alloc32`` onto the 2^(B+1)-level book's; ``alloc85`` onto 1/0.85 of the 2^B-level
book's (both clip more); ``alloc16`` onto the 16-level book's whatever B; ``allocE`` onto
E[max of D |N(0, 1)|] (≈ 2.6 for D = 64: a scaled token is about unit Gaussian, as the books assume);
``allocarg`` onto the outermost center of the channel that holds it (that entry lands on a center); ``allocstatic`` allocated, no
per-token scale; ``allochead`` the budget per head; ``had``/``hadraw`` no allocation: each
head's channels rotated by a Hadamard matrix (after the static normalisation, or the offset only),
a token's RMS as its scale, the head's 2^B-level book, rotated back (run 6: far worse at 2 bits);
``klt`` transform coding under the error's metric (:class:`KLT`: the Fisher-weighted queries'
eigenbasis from 2 calibration windows, levels water-filled over its components; run 7).

Usage:  python eval/research/query_alloc.py 4 absmax,alloc,allocmax,allocstatic [float32|bfloat16] [generation]
(``generation``: the rules' queries beside eval/causal_queries.py's caches on evaluation windows 1–4)
"""
import math, sys, time
from pathlib import Path
import numpy as np
import torch
from kvquant import query_quantizer, wrapped
from kvquant.io.assets import load_model
from kvquant.codebooks import Codebooks
from kvquant.io.data import held_out_windows, load_text
from kvquant.evaluation.diagnostics import KeysOnly, QueryKeyPair
from kvquant.evaluation.perplexity import evaluate, format_table
from kvquant.core import pair_codebooks as pcb
from kvquant.core.allocate import water_fill
from kvquant.core.packing import LEVEL_PACKING, level_bits
from kvquant.core.quantizer import channel_codes, channel_values
from kvquant.hf.wrap import attention_modules

torch.set_num_threads(2)
bits_list = [int(b) for b in sys.argv[1].split(",")] if len(sys.argv) > 1 else [4]
modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["absmax", "alloc"]
dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float32
books = Codebooks.load("out/default.safetensors")
model, tok = load_model("smollm2-135m", dtype=dtype)
text = load_text("enwiki-excerpt", split="test")
w = held_out_windows(tok, text, 2048, 6, books.calibration)
dev = w.ids[4:6]

u = np.linspace(-8, 8, 16001)
pdf = np.exp(-u * u / 2); pdf /= pdf.sum()


EMAX = {d: float(torch.randn(200000, d).abs().amax(-1).mean()) for d in (64,)}


def book_n(method, rho, n):
    return pcb._uncentered_pair(method, pcb.GaussianPair(float(rho), 0.0, 0.0), n, n)[0]


def mse(book):
    return float(np.sum(pdf * (u - book.centers[book.encode(u)]) ** 2))


def hadamard(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


class Alloc:
    rope = "pre"
    index_sink = True  # the tensor's token 0 exact: simulated windows start at position 0 (QueriesOnly clears it)

    def __init__(self, mode, b, base=None):
        self.mode, self.b = mode, b
        self.base = base or books.causal_queries(b, norm="channel-token")  # offsets, scales, uniform tables
        s = self.base.q
        L, H, D = s.offset.shape
        rho = books.stats.channel_moments().rho.mean(-1)
        method = books.config.method
        extra = int(mode.split("+")[1]) if "+" in mode else 2  # alloc+E: at most 2^(B+E) levels
        options = [n for n in sorted(LEVEL_PACKING) if n <= 2 ** min(b + extra, 8)]
        obits = np.array([level_bits(n) for n in options])
        cf = self._curves_weights()  # (L, H, D): what an error of unit variance in each channel costs
        tabs = {}
        eps = np.zeros((L, H, len(options)))
        for l in range(L):
            for h in range(H):
                r = round(float(rho[l, h]), 2)
                for i, n in enumerate(options):
                    key = (r, n)
                    if key not in tabs:
                        bk = book_n(method, r, n)
                        tabs[key] = (bk, mse(bk))
                    eps[l, h, i] = tabs[key][1]
        curves = 0.5 * cf[..., None] * eps[:, :, None, :]
        if mode == "allochead":
            chosen = np.stack([water_fill(curves[l, h], np.full(D, 1 / D), b, 0, len(options) - 1, obits)
                               for l in range(L) for h in range(H)]).reshape(L, H, D)
        else:
            chosen = water_fill(curves.reshape(-1, len(options)), np.full(L * H * D, 1 / (L * H * D)), b, 0,
                                len(options) - 1, obits).reshape(L, H, D)
        levels = np.array(options)[chosen]
        self.mean_bits = float(np.mean(obits[chosen]))
        K = max(options)
        self.centers = torch.empty(L, H, D, K)
        self.bounds = torch.full((L, H, D, K - 1), math.inf)
        self.top = torch.empty(L, H, 1)
        for l in range(L):
            for h in range(H):
                r = round(float(rho[l, h]), 2)
                for d in range(D):
                    bk = tabs[(r, int(levels[l, h, d]))][0]
                    n = len(bk.centers)
                    self.centers[l, h, d, :n] = torch.from_numpy(bk.centers)
                    self.centers[l, h, d, n:] = float(bk.centers[-1])
                    self.bounds[l, h, d, : n - 1] = torch.from_numpy(bk.boundaries)
                outer = self.centers[l, h].abs().amax(-1)
                top_levels = {"alloc32": 2 ** (b + 1), "alloc16": 16}.get(mode, 2**b)
                if (r, top_levels) not in tabs:
                    tabs[(r, top_levels)] = (book_n(method, r, top_levels), 0.0)
                self.top[l, h] = float(outer.max()) if mode == "allocmax" else float(tabs[(r, top_levels)][0].centers[-1])
                if mode == "allocE":  # E[max of D |N(0, 1)|]: the scaled token is ~unit Gaussian
                    self.top[l, h] = EMAX[D]
                if mode == "alloc85":
                    self.top[l, h] *= 1 / 0.85
        hist = np.bincount(np.searchsorted(options, levels.ravel()), minlength=len(options))
        if mode != "absmax" and not mode.startswith("had"):  # (absmax and had* keep 2^B levels everywhere; the tables above go unused)
            print(mode, "mean code bits", round(self.mean_bits, 4), dict(zip(options, hist.tolist())), flush=True)
        if mode.startswith("had"):  # the head's 2^B-level book per (layer, head), the rotation once
            self.hm = hadamard(D)
            self.had = {}
            for l in range(L):
                for h in range(H):
                    bk = book_n(method, round(float(rho[l, h]), 2), 2**b)
                    self.had[l, h] = (torch.from_numpy(bk.centers).float(), torch.from_numpy(bk.boundaries).float())

    def _curves_weights(self):
        return books.hist.channel_fisher_q.double().numpy()

    def effective_bits(self, head_dim=None, seqlen=None):
        return self.b

    def rotated(self, x, layer):
        """``had``: statically normalised channels rotated by a Hadamard matrix, a token's RMS as its
        scale, the head's 2^B-level book, rotated back; ``hadraw``: the same without the per-channel
        normalisation (offset only)."""
        s = self.base.q
        xf = x.float()
        off, sc = s.offset[layer][None, :, None, :], s.scale[layer][None, :, None, :]
        if self.mode == "hadraw":
            sc = torch.ones_like(sc)
        y = ((xf - off) / sc) @ self.hm
        r = y.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6).half().float()
        out = torch.empty_like(y)
        for h in range(y.shape[1]):
            c, bd = self.had[layer, h]
            out[:, h] = c[torch.bucketize(y[:, h] / r[:, h], bd)] * r[:, h]
        return (out @ self.hm.T) * sc + off

    def __call__(self, x, layer, side):
        if self.mode == "absmax":  # the library's books, their own index sink
            return self.base.q.apply(x, layer)
        out = self.rotated(x, layer) if self.mode.startswith("had") else self.quantized(x, layer)
        if self.index_sink:
            out[:, :, :1] = x[:, :, :1].float()  # the sink exact
        return out.to(x.dtype)

    def quantized(self, x, layer):
        """The rule's x̂ (float32), every token quantized."""
        s = self.base.q
        xf = x.float()
        off, sc = s.offset[layer][None, :, None, :], s.scale[layer][None, :, None, :]
        xn = (xf - off) / sc
        if self.mode == "allocstatic":
            r = torch.ones_like(xn[..., :1])
        elif self.mode == "allocarg":  # the largest |x̃| onto its own channel's outermost center
            outer = self.centers[layer].abs().amax(-1)[None, :, None, :]  # (1, H, 1, D)
            big, at = xn.abs().max(-1, keepdim=True)
            r = (big / outer.expand_as(xn).gather(-1, at)).clamp_min(1e-6).half().float()
        else:
            r = (xn.abs().amax(-1, keepdim=True) / self.top[layer][None, :, None]).clamp_min(1e-6).half().float()
        return channel_values(channel_codes(xn / r, self.bounds[layer]), self.centers[layer]) * r * sc + off


class QueryMoments:
    """Records Σ xn xnᵀ per (layer, head) of the statically normalised pre-RoPE queries (a
    pass-through quantizer): the KLT rule's covariance, from calibration tokens."""

    rope = "pre"
    key_group = 0

    def __init__(self, base):
        self.s = base.q
        L, H, D = self.s.offset.shape
        self.c, self.n = torch.zeros(L, H, D, D, dtype=torch.float64), 0

    def effective_bits(self, head_dim=None, seqlen=None):
        return 32.0

    def __call__(self, x, layer, side):
        if side == "q":
            xn = (x.float() - self.s.offset[layer][None, :, None, :]) / self.s.scale[layer][None, :, None, :]
            xn = xn[:, :, 1:]  # the sink left out (held exact)
            self.c[layer] += torch.einsum("bhtd,bhte->hde", xn, xn).double()
            self.n += xn.shape[0] * xn.shape[2] if layer == 0 else 0  # tokens seen (every layer sees the same)
        return x


class KLT(Alloc):
    """``klt``: transform coding of the query under the error's own metric. A query error e (in the
    statically normalised units) costs ≈ Σ_c F_c e_c² (F: the calibration's query Fisher weights,
    as ``alloc`` uses them); with z = F^{1/2} xn that is |e_z|², and in the eigenbasis V of z's
    covariance (calibration tokens: the end of the text, never the development windows) the
    components y = Vᵀ z are uncorrelated with variances λ_i. Each component gets 2 … 2^(B+2)
    levels by reverse water-filling ½ λ_i ε(n) (mean B bits per entry), y/√λ is scaled per token
    as ``alloc`` scales (largest entry onto the 2^B book's outermost center), and x̂ = F^{−1/2} V ŷ."""

    def __init__(self, b, calib_ids):
        base = books.causal_queries(b, norm="channel-token")
        mom = QueryMoments(base)
        with torch.no_grad(), wrapped(model, mom):
            for x in calib_ids:
                model(x[None])
        cov = (mom.c / mom.n).float()  # (L, H, D, D)
        cf = books.hist.channel_fisher_q.float()
        cf = torch.maximum(cf, 1e-3 * cf.mean(-1, keepdim=True))
        self.fh = cf.sqrt()  # (L, H, D)
        lam, vec = torch.linalg.eigh(self.fh[..., :, None] * cov * self.fh[..., None, :])
        self.lam, self.vec = lam.clamp_min(1e-12), vec  # (L, H, D), (L, H, D, D): columns are components
        super().__init__("klt", b, base)

    def _curves_weights(self):
        return self.lam.double().numpy()

    def quantized(self, x, layer):
        s = self.base.q
        xf = x.float()
        off, sc = s.offset[layer][None, :, None, :], s.scale[layer][None, :, None, :]
        fh, v, sl = self.fh[layer][None, :, None, :], self.vec[layer], self.lam[layer].sqrt()[None, :, None, :]
        y = torch.einsum("bhtd,hde->bhte", (xf - off) / sc * fh, v) / sl
        r = (y.abs().amax(-1, keepdim=True) / self.top[layer][None, :, None]).clamp_min(1e-6).half().float()
        yq = channel_values(channel_codes(y / r, self.bounds[layer]), self.centers[layer]) * r * sl
        return torch.einsum("bhte,hde->bhtd", yq, v) / fh * sc + off


def calibration_ids(n: int = 2):
    """``n`` windows of 2048 tokens from the codebook file's calibration range (the end of the text)."""
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert len(ids) == books.calibration["total_tokens"], "not the calibration's tokenization"
    first = int(books.calibration["first_token"])
    return [ids[first + i * 2048 : first + (i + 1) * 2048] for i in range(n)]


class QueriesOnly:
    """A rule's queries beside a KV cache (generation mode): the rule without its index-0 sink —
    a decoding step's one query is not the sink — and the sink from the positions the attention
    module was called with (stashed by kvquant.wrap's pre-hook), as :class:`kvquant.QueryQuantizer`
    keeps it; bits as that quantizer counts them for the rule's books."""

    rope, sides = "pre", ("q",)

    def __init__(self, rule):
        rule.index_sink = False
        self.rule, self.books = rule, query_quantizer(rule.base, model)
        self.modules = {m.layer_idx: m for m in attention_modules(model)}

    def effective_bits(self, head_dim=None, *args, **kwargs):
        return self.books.effective_bits(head_dim)

    def __call__(self, x, layer, side):
        if side != "q":
            return x
        exact = (self.modules[layer].kvquant_positions < self.books.sink).expand(x.shape[0], -1)
        return torch.where(exact[:, None, :, None].to(x.device), x, self.rule(x, layer, side))


if len(sys.argv) > 4 and sys.argv[4] == "generation":  # the rules beside the caches, evaluation windows 1-4
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from causal_queries import CACHES
    from kvquant.evaluation.generation import cache_factories, evaluate_generation
    from kvquant.evaluation.perplexity import make_rows
    ev = w.ids[:4]
    caches = cache_factories(model, {"fp": None, **make_rows(list(CACHES), books, 2048, generation=True)})
    factories, queries = {"fp": caches["fp"]}, {}
    for name, qb in CACHES.items():
        if qb in bits_list:
            for mode in modes:
                label = f"{name} +q{qb} {mode}"
                rule = KLT(qb, calibration_ids()) if mode == "klt" else Alloc(mode, qb)
                factories[label], queries[label] = caches[name], QueriesOnly(rule)
    t0 = time.time()
    res = evaluate_generation(model, ev, factories, queries=queries)
    print("evaluation windows 1-4, generation mode (every token reads the cache)")
    print(format_table(res))
    print("seconds", time.time() - t0)
    sys.exit(0)

keys = KeysOnly(books)
rows = {"fp": None, "keys only": keys}
for b in bits_list:
    for mode in modes:
        rows[f"{mode}@{b}"] = QueryKeyPair(KLT(b, calibration_ids()) if mode == "klt" else Alloc(mode, b), books)
t0 = time.time()
res = evaluate(model, dev, rows)
print(format_table(res))
print("seconds", time.time() - t0)
