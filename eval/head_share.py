"""The seed paper's own metric for kvquant's shipped configurations: per attention head, the
relative logit error ``‖(Q̂K̂ᵀ − QKᵀ) ⊙ M‖ / ‖QKᵀ ⊙ M‖`` (:func:`kvquant.evaluation.diagnostics.logit_errors`,
always on the post-RoPE logits the model attends with) and the share of heads where the density
codebook's error is lower than INT's and FP's, each comparison at the same place:

(a) ``post``      Q and K both quantized after the rotary embedding, density codebook with static
                  per-head (μ, σ) from calibration (the seed paper's setting; BENCHMARKS.md
                  ``ppl-smollm2`` measured it at 8 bits: 0% of heads vs INT8, 24% vs FP8), and
                  ``/channel``: the same codebook on static per-channel (μ, σ) — the Gaussian
                  model applied per channel instead of to the head's channels pooled;
(b) ``pre``       the same, before the rotary embedding (rotation undone inside attention, entries
                  quantized, rotated back; per-head (μ, σ) from the pre-RoPE calibration);
(c) ``deployed``  the KV cache's quantizer: keys only, queries exact, pre-RoPE, min–max per
                  channel over groups of G tokens (8-bit scales, first token exact), keys read
                  quantized only once their group is complete (block-causal), every key channel
                  at b code bits (``books.rebuilt(bits_k=b, budget=0)``); the same layout with
                  evenly spaced levels (``uniform``: min–max INT b), per-token INT / FP keys at the
                  same place and block-causal, and the KIVI-style post-RoPE INT b per channel group;
                  plus the file as shipped (bits allocated over key channels) as a reference;
(d) ``qk``        a ``Q̂·K̂ᵀ`` a decoder can run: the keys of (c), and the queries quantized causally
                  from their own token — static per-channel (μ, σ), the head's pair codebook at
                  b bits and a per-token scale (:meth:`kvquant.codebooks.Codebooks.causal_queries`,
                  norm ``channel-token``), first token exact; ``klt``: the queries transform-coded
                  (norm ``klt``: the Fisher-weighted queries' eigenbasis; files with Fisher weights);
                  ``uniform`` the same layouts with evenly spaced levels; ``int``/``fp`` per-token
                  absmax on both sides, pre-RoPE, keys block-causal.

Baselines: ``int{b}`` symmetric absmax INT per token, ``fp8`` (e4m3) / ``fp4`` (e2m1) per token,
``int{b}-channel`` min–max per channel over groups of 128 tokens (fp16 scales; in (a)/(b) all
tokens, the incomplete last group included — a prefill setting), all from kvquant.evaluation.baselines.

Where the Gaussian pair model holds: per head, pair-weighted moments of q and k in each frame
(each query entry weighted by the keys it meets, each key entry by the queries that meet it, as
kvquant's pair statistics): excess kurtosis of (x − μ_h)/σ_h pooled over the head's channels
(what a static per-head codebook sees), the median per-channel excess kurtosis, the share of
energy E[x²] in the D/16 largest channels, ρ of the calibration, and the overload of the static
8-bit codebook (share of entries beyond its outermost centers); win rates by tercile.

Calibration statistics come from the codebook file (its windows from the END of the text; the
post-RoPE statistics of (a) are captured here on the same windows); without ``--codebooks`` they
are captured here on ``--calib`` windows from the end (no Fisher weights: no shipped row).
Evaluation windows are the FIRST ``--windows`` of the text.

Usage:  python eval/head_share.py --codebooks out/default.safetensors --windows 2 [--bits 8,4]
        python eval/head_share.py --model gemma3-270m --name gemma3 --calib 2 --windows 1
        python eval/head_share.py --name smollm2 --replot        (tables and figure from the JSON)
Writes out/head_share_<name>.json, docs/head_share_<name>.png and the section
``head-share-<name>`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kvquant.io.assets import load_model
from kvquant.evaluation.baselines import Baseline, kivi_codebooks
from kvquant.hf.calibrate import capture, capture_stats, run_capture
from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.io.data import held_out_windows, load_text, make_windows, split_calib_eval
from kvquant.evaluation.diagnostics import KeysOnly, QueryKeyPair, logit_errors
from kvquant.io.fileio import atomic_path, replace_section, write_text
from kvquant.io.fingerprint import ModelFingerprint

ROOT = Path(__file__).resolve().parents[1]
PLACES = {
    "post": "(a) post-RoPE, Q and K, static σ",
    "pre": "(b) pre-RoPE, Q and K, static σ",
    "deployed": "(c) deployed: keys only, pre-RoPE, channel groups, block-causal",
    "qk": "(d) deployable Q·Kᵀ: causal queries beside the deployed keys",
}
#: (place, density row, the rows it is compared with) ({b}: bits; {fp}: fp8 / fp4)
COMPARE = [
    ("post", "lambda@{b}", ["int{b}", "{fp}", "int{b}-channel"]),
    ("post", "lambda@{b}/channel", ["int{b}", "{fp}", "int{b}-channel"]),
    ("pre", "lambda@{b}", ["int{b}", "{fp}", "int{b}-channel"]),
    ("pre", "lambda@{b}/channel", ["int{b}", "{fp}", "int{b}-channel"]),
    ("deployed", "lambda-lloyd@{b}", ["uniform@{b}", "int{b}", "{fp}", "kivi@{b}", "lambda@{b}"]),
    ("qk", "lambda-lloyd@{b}", ["uniform@{b}", "int{b}", "{fp}"]),
    ("qk", "lambda-lloyd@{b} klt", ["lambda-lloyd@{b}", "int{b}", "{fp}"]),
]


# --- quantizers -------------------------------------------------------------------------------


def quantizers(books: Codebooks, static_post: Codebooks, bits: int, head_dim: int, seqlen: int) -> dict:
    """``{place:row: quantizer}`` at ``bits`` (module docstring), with effective bits per entry."""
    fp = {8: "fp8", 4: "fp4"}.get(bits)
    rows = {}
    for norm, suffix in (("head", ""), ("channel", "/channel")):
        rows[f"post:lambda@{bits}{suffix}"] = static_post.rebuilt(norm=norm, bits_q=bits, bits_k=bits)
        rows[f"pre:lambda@{bits}{suffix}"] = books.rebuilt(norm=norm, method="lambda", bits_q=bits, bits_k=bits, budget=0.0,
                                                           budget_sides="qk", scale_bits=16, sink=0, outliers=0.0)
    for base in [f"int{bits}", fp, f"int{bits}-channel"]:
        if base:
            rows[f"post:{base}"], rows[f"pre:{base}"] = Baseline(base), Baseline(base, rope="pre")
    group = books.key_group
    for method in ("lambda-lloyd", "lambda", "uniform"):
        rows[f"deployed:{method}@{bits}"] = KeysOnly(books.rebuilt(method=method, bits_q=bits, bits_k=bits, budget=0.0,
                                                                   budget_sides="k"))
    for base in [f"int{bits}", fp]:
        if base:
            rows[f"deployed:{base}"] = KeysOnly(Baseline(base, rope="pre"), key_group=group)
    rows[f"deployed:kivi@{bits}"] = KeysOnly(kivi_codebooks(books, bits))
    for method in ("lambda-lloyd", "uniform"):  # (d): queries static per channel, keys as the cache holds them
        keys = books.rebuilt(method=method, bits_q=bits, bits_k=bits, budget=0.0, budget_sides="k")
        rows[f"qk:{method}@{bits}"] = QueryKeyPair(keys.causal_queries(bits, norm="channel-token"), keys)
        if method == "lambda-lloyd" and books.hist is not None and books.hist.gram_q is not None:
            rows[f"qk:{method}@{bits} klt"] = QueryKeyPair(keys.causal_queries(bits, norm="klt"), keys)
    for base in [f"int{bits}", fp]:
        if base:
            rows[f"qk:{base}"] = QueryKeyPair(Baseline(base, rope="pre"), Baseline(base, rope="pre"), key_group=group)
    bits_of = {name: effective_bits(q, head_dim, seqlen) for name, q in rows.items()}
    return rows, bits_of


def effective_bits(quant, head_dim: int, seqlen: int) -> float:
    """Bits per quantized entry (keys only for the deployed rows), scales and exact entries counted."""
    inner = getattr(quant, "quantizer", quant)
    return float(inner.effective_bits(head_dim=head_dim, seqlen=seqlen))


# --- head shape statistics --------------------------------------------------------------------


class Moments:
    """Pair-weighted sums ``Σ w·x^p``, p = 0…4, per (layer, head, channel) of q (H heads) and k
    (H_kv heads), and the overload of static codebooks ``books`` (per-head offset/scale and outer
    centers): pair-weighted count and squared excess of entries beyond the outer centers."""

    def __init__(self, layers: int, heads: int, kv_heads: int, head_dim: int, books: Codebooks):
        z = lambda h: torch.zeros(layers, h, head_dim, 5, dtype=torch.float64)  # noqa: E731
        self.q, self.k = z(heads), z(kv_heads)
        self.over = {s: torch.zeros(layers, h, 3, dtype=torch.float64) for s, h in (("q", heads), ("k", kv_heads))}
        self.books = books

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(torch.float64)
        n_t, m_s = m.sum(-1)[..., None], m.sum(-2)[..., None]  # (B|1, 1, T, 1), (B|1, 1, S, 1)
        for side, x, w in (("q", q, n_t), ("k", k, m_s)):
            x64 = x.double()
            acc = getattr(self, side)
            p = torch.ones_like(x64)
            for i in range(5):
                acc[layer, :, :, i] += (w * p).sum(dim=(0, 2))
                p = p * x64
            sb = getattr(self.books, side)  # static per-head: offset/scale (L, H, D), centers (L, H, K)
            u = (x64 - sb.offset[layer].double()[None, :, None]) / sb.scale[layer].double()[None, :, None]
            lo, hi = sb.centers[layer, :, 0].double(), sb.centers[layer, :, -1].double()
            excess = (u - hi[None, :, None, None]).clamp_min(0) + (lo[None, :, None, None] - u).clamp_min(0)
            self.over[side][layer, :, 0] += (w * (excess > 0)).sum(dim=(0, 2, 3))
            self.over[side][layer, :, 1] += (w * excess**2).sum(dim=(0, 2, 3))
            self.over[side][layer, :, 2] += (w * u**2).sum(dim=(0, 2, 3))


def shape_stats(mom: Moments, g: int) -> dict[str, torch.Tensor]:
    """Per (layer, query head): pooled and median per-channel excess kurtosis, outlier-channel
    energy share, overload share of the static codebook, for q and k (keys repeated over their g
    query heads)."""
    out = {}
    for side, s in (("q", mom.q), ("k", mom.k)):
        w = s[..., 0].clamp_min(1e-300)
        mu, m2, m3, m4 = (s[..., i] / w for i in (1, 2, 3, 4))  # raw moments per channel
        var = m2 - mu**2
        c4 = m4 - 4 * mu * m3 + 6 * mu**2 * m2 - 3 * mu**4
        live = var > 1e-9 * m2.clamp_min(1e-300)  # a channel constant over the window (e.g. 0) has no shape
        kurt_ch = torch.where(live, c4 / torch.where(live, var, 1.0) ** 2 - 3, float("nan"))
        pooled = s.sum(2)  # channels pooled: the head's entries
        wp = pooled[..., 0]
        mu_h, m2h, m3h, m4h = (pooled[..., i] / wp for i in (1, 2, 3, 4))
        var_h = (m2h - mu_h**2).clamp_min(1e-300)
        kurt_h = (m4h - 4 * mu_h * m3h + 6 * mu_h**2 * m2h - 3 * mu_h**4) / var_h**2 - 3
        energy = m2  # E[x²] per channel
        top = max(1, energy.shape[-1] // 16)
        share = energy.topk(top, dim=-1).values.sum(-1) / energy.sum(-1).clamp_min(1e-300)
        over = mom.over[side]
        rep = (lambda t: t.repeat_interleave(g, dim=1)) if side == "k" else (lambda t: t)  # noqa: E731
        out[f"kurt_head_{side}"] = rep(kurt_h)
        out[f"kurt_channel_{side}"] = rep(kurt_ch.nanmedian(-1).values)
        out[f"outlier_energy_{side}"] = rep(share)
        out[f"overload_{side}"] = rep(over[..., 0] / wp)
        out[f"overload_energy_{side}"] = rep(over[..., 1] / over[..., 2].clamp_min(1e-300))
    return out


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--dataset", default="enwiki-excerpt")
    ap.add_argument("--codebooks", help="codebook file (channel-group, pre-RoPE); without it, calibrate here")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=1, help="evaluation windows (start of the text)")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows (end of the text) without --codebooks")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", action="store_true", help="tables and figure from out/head_share_<name>.json")
    args = ap.parse_args(argv)
    out_json = ROOT / "out" / f"head_share_{args.name}.json"
    if args.replot:
        payload = json.loads(out_json.read_text())
    else:
        payload = measure(args, argv)
        write_text(out_json, json.dumps(payload, indent=1))
    md = markdown(payload, args.name)
    print(md)
    figure(payload, ROOT / "docs" / f"head_share_{args.name}.png")
    replace_section(ROOT / "BENCHMARKS.md", f"head-share-{args.name}", md)


def measure(args, argv) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)  # the float32 tables of BENCHMARKS.md
    fp = ModelFingerprint.from_model(model)
    text = load_text(args.dataset)
    if args.codebooks:
        books = Codebooks.load(args.codebooks)
        books.check_fits(model)
        cal = books.calibration
        calib = make_windows(tok, text, cal["seqlen"], cal["windows"], from_end=True, source=args.dataset)
        evals = held_out_windows(tok, text, args.seqlen, args.windows, cal, source=args.dataset)
    else:  # the deployed layout (configs/default.yaml) at 8 bits per key channel, no allocation
        calib, evals = split_calib_eval(tok, text, args.seqlen, args.calib, args.windows, source=args.dataset)
        config = CodebookConfig(method="lambda-lloyd", bits_q=8, bits_k=8, norm="channel-group", group=128, sink=1,
                                rope="pre", budget_sides="k", scale_bits=8)
        key = (config.group, config.sink, 0.0, config.scale_bits)
        stats, hists = capture(model, calib.ids, [key], rope="pre")
        books = Codebooks.from_stats(stats, config, fp, {"source": args.dataset, "windows": calib.n,
                                                         "seqlen": calib.seqlen}, hists[key])
    t_cal = time.perf_counter()
    stats_post = capture_stats(model, calib.ids)
    static_post = Codebooks.from_stats(stats_post, CodebookConfig("lambda", 8, 8, "head"), fp, books.calibration)
    bits_list = [int(b) for b in args.bits.split(",")]
    rows, bits_of = {}, {}
    for b in bits_list:
        r, e = quantizers(books, static_post, b, fp.head_dim, args.seqlen)
        rows |= r
        bits_of |= e
    if books.config.budget and books.hist is not None and books.hist.fisher_q is not None:
        rows["deployed:shipped"] = KeysOnly(books)
        bits_of["deployed:shipped"] = effective_bits(books, fp.head_dim, args.seqlen)
    t_rows = time.perf_counter()
    errors = logit_errors(model, evals.ids, rows)
    t_err = time.perf_counter()
    g = fp.num_heads // fp.num_kv_heads
    shape = {}
    static8 = {"post": static_post, "pre": books.rebuilt(norm="head", method="lambda", bits_q=8, bits_k=8, budget=0.0,
                                                          budget_sides="qk", scale_bits=16, sink=0, outliers=0.0)}
    for frame, sb in static8.items():
        mom = Moments(fp.num_layers, fp.num_heads, fp.num_kv_heads, fp.head_dim, sb)
        run_capture(model, evals.ids, mom, desc=f"moments {frame}", rope=frame)
        shape[frame] = {k: v.tolist() for k, v in shape_stats(mom, g).items()}
        shape[frame]["rho"] = sb.stats.head_moments().rho.tolist()
    command = "python eval/head_share.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return {
        "command": command.strip(), "model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
        "eval_windows": evals.n, "bos_prepended": evals.bos_prepended, "calibration": books.calibration,
        "codebooks": args.codebooks, "config": asdict(books.config), "bits": bits_list, "dtype": "float32",
        "heads": fp.num_heads, "kv_heads": fp.num_kv_heads, "layers": fp.num_layers, "head_dim": fp.head_dim,
        "seconds": {"calibration": t_cal - t0, "static_post": t_rows - t_cal, "logit_errors": t_err - t_rows,
                    "moments": time.perf_counter() - t_err},
        "effective_bits": bits_of,
        "errors": {k: v.tolist() for k, v in errors.items()},
        "shape": shape,
    }


# --- report -----------------------------------------------------------------------------------


def _fmt(name: str, b: int) -> str:
    return name.format(b=b, fp={8: "fp8", 4: "fp4"}.get(b, "fp"))


def comparisons(p: dict) -> list[tuple[int, str, str, str]]:
    """``(bits, place, density row, competitor row)`` present in the payload."""
    out = []
    for b in p["bits"]:
        for place, dens, others in COMPARE:
            d = f"{place}:{_fmt(dens, b)}"
            out += [(b, place, d, f"{place}:{_fmt(o, b)}") for o in others
                    if f"{place}:{_fmt(o, b)}" in p["errors"] and d in p["errors"]]
    return out


def _short(row: str) -> str:
    return row.split(":", 1)[1]


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


STATS = {  # shape statistic → label
    "kurt_head_k": "keys: pooled excess kurtosis of (k−μ_h)/σ_h",
    "kurt_head_q": "queries: pooled excess kurtosis",
    "kurt_channel_k": "keys: median per-channel excess kurtosis",
    "kurt_channel_q": "queries: median per-channel excess kurtosis",
    "outlier_energy_k": "keys: energy share of the D/16 largest channels",
    "overload_k": "keys: share of entries beyond the static 8-bit codebook's outer centers",
    "overload_q": "queries: the same",
    "rho": "ρ (calibration, per head)",
}


def markdown(p: dict, name: str) -> str:
    e = {k: np.asarray(v) for k, v in p["errors"].items()}
    L, H = p["layers"], p["heads"]
    out = [
        f"## The seed paper's metric for the shipped configurations: {p['model']}, {p['dataset']}",
        "",
        f"Command: `{p['command']}` — {p['eval_windows']} evaluation window(s) of {p['seqlen']} tokens from the start "
        f"of the text; calibration statistics from {p['calibration'].get('windows')} windows of "
        f"{p['calibration'].get('seqlen')} from its end"
        + (f" (the codebook file `{p['codebooks']}`; the post-RoPE statistics of (a) captured on the same windows)"
           if p.get("codebooks") else " (captured by the command, no Fisher weights)")
        + f"; float32; BOS prepended: {p['bos_prepended']}; {L} layers × {H} query heads ({p['kv_heads']} KV heads, "
        f"head_dim {p['head_dim']}).",
        "",
        "Per query head, the relative error of the post-RoPE attention logits the model uses, "
        "‖(Q̂K̂ᵀ − QKᵀ) ⊙ M‖_F / ‖QKᵀ ⊙ M‖_F over the allowed pairs M (`kvquant.evaluation.diagnostics.logit_errors`), every "
        "quantizer applied where the attention function applies it. (a) Q and K post-RoPE, density codebook "
        "(`lambda`, the closed form λ*) on static per-head (μ, σ) — the seed paper's setting — and, `/channel`, on "
        "static per-channel (μ, σ) (the Gaussian model per channel; nothing added per entry either); (b) the same "
        "pre-RoPE; (c) the deployed KV cache's key quantizer: keys only, queries exact, pre-RoPE, min–max per "
        f"channel over groups of {p['config']['group']} tokens with {p['config']['scale_bits']}-bit scales, first token exact, a key read quantized only once its "
        "group is complete (block-causal), the codebook from the calibration histogram (`lambda-lloyd`, as shipped, "
        "every key channel at b bits here); `uniform` is min–max INT b on that same layout, `int`/`fp` per-token "
        "absmax keys at the same place (pre-RoPE, block-causal), `kivi` min–max INT b per channel group post-RoPE "
        "with fp16 scales and no sink. In (a)/(b) `int{b}-channel` groups all tokens of the window, the incomplete "
        "last group included (a prefill setting). (d) queries and keys both quantized as a decoder can: the keys of "
        "(c) and the queries causal, from their own token (static per-channel (μ, σ), the head's pair codebook at b "
        "bits and an fp16 scale per token mapping its largest entry onto the outermost center, "
        "`Codebooks.causal_queries`), `uniform` the same layouts with evenly spaced levels, `int`/`fp` "
        "per-token absmax on both sides, pre-RoPE, keys block-causal. Effective bits per quantized entry count "
        "scales and exact tokens ((d): the mean of the query and key sides).",
        "",
        "**Share of heads where the density codebook's logit error is lower** (the seed paper's number):",
        "",
        "| bits | place | density row | vs | competitor eff. bits | density wins | density mean err | competitor mean err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, place, d, c in comparisons(p):
        out.append(f"| {b} | {PLACES[place]} | `{_short(d)}` [{p['effective_bits'][d]:.2f}b] | `{_short(c)}` | "
                   f"{p['effective_bits'][c]:.2f} | **{(e[d] < e[c]).mean():.0%}** | {e[d].mean():.4f} | "
                   f"{e[c].mean():.4f} |")
    first = ROOT / "out" / f"head_share_{name}_w1.json"  # the first window alone, as ppl_table.py measured it
    if first.is_file() and p["eval_windows"] > 1:
        w1 = json.loads(first.read_text())
        ew, b = {k: np.asarray(v) for k, v in w1["errors"].items()}, w1["bits"][0]
        d, c1, c2 = f"post:lambda@{b}", f"post:int{b}", f"post:{_fmt('{fp}', b)}"
        if {d, c1, c2} <= set(ew):
            note = f"; {w1['note']}" if w1.get("note") else ""
            out += ["", f"The first evaluation window alone (`out/{first.name}`: `{w1['command']}`{note}): mean error "
                    f"`{_short(d)}` {ew[d].mean():.4f}, `{_short(c1)}` {ew[c1].mean():.4f}, `{_short(c2)}` "
                    f"{ew[c2].mean():.4f}; the density lower in {(ew[d] < ew[c1]).mean():.0%} / "
                    f"{(ew[d] < ew[c2]).mean():.0%} of heads — the `ppl-{name}` measurement (one window) reproduced."]
    if "deployed:shipped" in e:
        s = e["deployed:shipped"]
        out += ["", f"As shipped (`{p['codebooks']}`, key code bits allocated over channels, "
                f"{p['effective_bits']['deployed:shipped']:.2f} effective bits per key entry): mean logit error "
                f"{s.mean():.4f} (median {np.median(s):.4f}); lower than per-token INT4 keys at the same place in "
                f"{(s < e['deployed:int4']).mean():.0%} of heads, than min–max INT4 on the same layout in "
                f"{(s < e['deployed:uniform@4']).mean():.0%}." if "deployed:int4" in e and "deployed:uniform@4" in e
                else ""]
    out += ["", "All rows (mean / median / max over heads):", "", "| row | eff. bits | mean | median | max |",
            "|---|---|---|---|---|"]
    for r, v in e.items():
        out.append(f"| `{r}` | {p['effective_bits'][r]:.3f} | {v.mean():.4f} | {np.median(v):.4f} | {v.max():.4f} |")
    b0 = p["bits"][0]
    cols = [("post", f"post:lambda@{b0}", f"post:int{b0}"), ("post", f"post:lambda@{b0}", f"post:{_fmt('{fp}', b0)}"),
            ("pre", f"pre:lambda@{b0}", f"pre:int{b0}"), ("pre", f"pre:lambda@{b0}", f"pre:{_fmt('{fp}', b0)}"),
            ("deployed", f"deployed:lambda-lloyd@{b0}", f"deployed:uniform@{b0}"),
            ("deployed", f"deployed:lambda-lloyd@{b0}", f"deployed:int{b0}")]
    cols = [c for c in cols if c[1] in e and c[2] in e]
    out += ["", f"Per layer at {b0} bits: heads (of {H}) where the density row wins, and mean errors:", "",
            "| layer | " + " | ".join(f"{place} `{_short(d)}` < `{_short(c)}`" for place, d, c in cols)
            + f" | mean `post:lambda@{b0}` / `post:int{b0}` | mean `pre:lambda@{b0}` | mean `deployed:lambda-lloyd@{b0}` "
            f"/ `deployed:uniform@{b0}` |",
            "|" + "---|" * (len(cols) + 4)]
    for layer in range(L):
        wins = " | ".join(f"{int((e[d][layer] < e[c][layer]).sum())}" for _, d, c in cols)
        out.append(f"| {layer} | {wins} | {e[f'post:lambda@{b0}'][layer].mean():.4f} / {e[f'post:int{b0}'][layer].mean():.4f}"
                   f" | {e[f'pre:lambda@{b0}'][layer].mean():.4f} | {e[f'deployed:lambda-lloyd@{b0}'][layer].mean():.4f}"
                   f" / {e[f'deployed:uniform@{b0}'][layer].mean():.4f} |")
    out += ["", *shape_section(p, b0), "", f"![per-head logit error ratio vs key kurtosis](docs/head_share_{name}.png)"]
    return "\n".join(out)


def shape_section(p: dict, b: int) -> list[str]:
    """Where the Gaussian pair model holds: the statistics per head, win rates by tercile and
    Spearman correlation of each statistic with log(error ratio)."""
    e = {k: np.asarray(v) for k, v in p["errors"].items()}
    fp_name = _fmt("{fp}", b)
    comps = [(f"post:lambda@{b}", f"post:int{b}", "post"), (f"post:lambda@{b}", f"post:{fp_name}", "post"),
             (f"post:lambda@{b}/channel", f"post:int{b}", "post"),
             (f"pre:lambda@{b}", f"pre:int{b}", "pre"), (f"pre:lambda@{b}", f"pre:{fp_name}", "pre"),
             (f"pre:lambda@{b}/channel", f"pre:int{b}", "pre"),
             (f"deployed:lambda-lloyd@{b}", f"deployed:uniform@{b}", "pre"),
             (f"deployed:lambda-lloyd@{b}", f"deployed:int{b}", "pre")]
    comps = [c for c in comps if c[0] in e and c[1] in e]
    out = ["### Where the Gaussian pair model holds and where it breaks", "",
           "Per head, on the evaluation window(s), pair-weighted (a query entry counts once per key it meets, a key "
           "entry once per query): statistics of q and k in the frame each comparison quantizes in (post-RoPE for "
           "(a), pre-RoPE for (b) and (c)); a Gaussian has excess kurtosis 0, an even spread of energy over the "
           f"{p['head_dim']} channels puts 6.25% in the largest {max(1, p['head_dim'] // 16)} (D/16); the per-channel "
           "kurtosis leaves out channels constant over the window. Median over heads [10th–90th percentile]:", "",
           "| statistic | post-RoPE | pre-RoPE |", "|---|---|---|"]
    for key, label in STATS.items():
        cells = []
        for frame in ("post", "pre"):
            v = np.asarray(p["shape"][frame][key])
            cells.append(f"{np.median(v):.3g} [{np.percentile(v, 10):.3g}–{np.percentile(v, 90):.3g}]")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", f"Win rate of the density row at {b} bits by tercile of each statistic (low / mid / high), and "
            "Spearman ρ_s of the statistic with log(density error / competitor error) (positive: the density "
            "does worse as the statistic grows):", "",
            "| statistic | " + " | ".join(f"`{_short(d)}` < `{_short(c)}` ({f})" for d, c, f in comps) + " |",
            "|" + "---|" * (len(comps) + 1)]
    for key, label in STATS.items():
        cells = []
        for d, c, frame in comps:
            x = np.asarray(p["shape"][frame][key]).ravel()
            win = (e[d] < e[c]).ravel()
            ratio = np.log(e[d] / e[c]).ravel()
            cuts = np.quantile(x, [1 / 3, 2 / 3])
            bins = np.digitize(x, cuts)
            rates = "/".join(f"{win[bins == i].mean():.0%}" if (bins == i).any() else "–" for i in range(3))
            cells.append(f"{rates}, ρ_s {spearman(x, ratio):+.2f}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def figure(p: dict, path: Path) -> None:
    """Per head: error ratio density / competitor against the keys' kurtosis (pooled over the head's
    channels, in the frame quantized), one panel per place at the first bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    b = p["bits"][0]
    fp_name = _fmt("{fp}", b)
    e = {k: np.asarray(v) for k, v in p["errors"].items()}
    panels = []
    for place in ("post", "pre"):
        panels.append((place, PLACES[place], [(f"{place}:lambda@{b}", f"{place}:int{b}"),
                                              (f"{place}:lambda@{b}", f"{place}:{fp_name}"),
                                              (f"{place}:lambda@{b}/channel", f"{place}:int{b}")]))
    panels.append(("pre", PLACES["deployed"], [(f"deployed:lambda-lloyd@{b}", f"deployed:uniform@{b}"),
                                               (f"deployed:lambda-lloyd@{b}", f"deployed:int{b}"),
                                               (f"deployed:lambda-lloyd@{b}", f"deployed:kivi@{b}")]))
    style = [("o", "tab:blue"), ("^", "tab:orange"), ("s", "tab:green")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), constrained_layout=True)
    try:
        for ax, (frame, title, pairs) in zip(axes, panels):
            kurt = np.asarray(p["shape"][frame]["kurt_head_k"]).ravel() + 3
            for (d, c), (marker, colour) in zip(pairs, style):
                if c not in e or d not in e:
                    continue
                y = (e[d] / e[c]).ravel()
                ax.scatter(kurt, y, marker=marker, color=colour, s=16, alpha=0.7,
                           label=f"`{_short(d)}` / `{_short(c)}`: density lower in {(y < 1).mean():.0%} of heads")
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.axvline(3.0, color="grey", linewidth=0.8, linestyle="--", label="Gaussian (kurtosis 3)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = [t for t in (2, 3, 5, 10, 20, 50, 100, 200, 500) if min(kurt.min(), 3) / 1.2 <= t <= kurt.max() * 1.2]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"kurtosis of the keys, channels pooled ((k − μ_h)/σ_h, {frame}-RoPE)")
            ax.set_ylabel("logit error of the density row / competitor's")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8, loc="best")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{p['model']} · {p['dataset']} · {p['eval_windows']} window(s) of {p['seqlen']} tokens · {b} bits · "
                     "one point per (layer, query head); below 1 = the density codebook's logit error is lower",
                     fontsize=11)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
