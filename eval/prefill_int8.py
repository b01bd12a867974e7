"""Prefill attention with ``Q·Kᵀ`` from INT8 codes (``kvquant.wrap(model, prefill="int8")``) against
SDPA, all rows in one run: speed of attention alone and of a whole forward, and perplexity.

(a) Attention alone: one causal prefill call at SmolLM2-135M's geometry (9 query heads over 3 KV
    heads, head_dim 64), random bf16 q, k, v, at each of ``--lengths`` tokens and ``--threads``:
    torch's SDPA in bfloat16 (GQA by ``enable_gqa``) and in float32, and
    :func:`kvquant.kernels.prefill_cpu.prefill_attention` on the bf16 tensors (its float32 output
    cast back to bf16, as the attention function returns it). Median of ``--reps`` runs after one
    warm-up (one run, no warm-up, from 16384 tokens on).
(b) A whole forward: the real model in ``--dtype`` (default ``auto``: bfloat16 as shipped, float32 on
    a CPU without bfloat16 instructions) on the first ``--forward-lengths`` tokens of the text, no
    cache, wrapped with ``prefill="sdpa"`` (bit-identical to SDPA) and ``prefill="int8"``.
(c) Perplexity on the text's first ``--windows`` windows of ``--seqlen`` tokens (the main job's
    evaluation windows; nothing here is tuned on text), one forward per window, every position
    attending as a prefill does: ``fp`` (SDPA), ``int8`` (the kernel) and ``int8-simulated``
    (:func:`kvquant.kernels.prefill_cpu.reference_attention`, the same math in torch), with the KL
    divergence from ``fp``.

Usage:  python eval/prefill_int8.py [--lengths 2048,8192,32768] [--forward-lengths 2048,8192]
            [--threads 1,2] [--windows 4] [--seqlen 2048] [--dtype auto] [--no-markdown]
Prints markdown tables, writes out/prefill_int8.json and the ``prefill-int8`` section of
BENCHMARKS.md (``--no-markdown``: print only).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from bench_decode import platform_line  # eval/ (the script's folder) is on sys.path
from tqdm import tqdm

import kvquant
from kvquant.evaluation.divergence import Agreement, log_probs
from kvquant.evaluation.perplexity import PplRow, format_table
from kvquant.io.assets import load_model
from kvquant.io.data import load_text, make_windows
from kvquant.io.fileio import atomic_path, replace_section
from kvquant.kernels import prefill_cpu

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, reps: int, warm: bool = True) -> float:
    if warm:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def attention_rows(lengths: list[int], threads: list[int], reps: int) -> list[dict]:
    h, hk, d = 9, 3, 64
    recs = []
    for t in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, t, d, generator=g).to(torch.bfloat16) for n in (h, hk, hk))
        qf, kf, vf = q.float(), k.float(), v.float()
        long = t >= 16384
        n = 1 if long else reps
        for th in threads:
            torch.set_num_threads(th)
            rec = {"tokens": t, "threads": th}
            rec["sdpa_bf16_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                            n, not long)
            rec["sdpa_fp32_ms"] = median_ms(lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True,
                                                                                   enable_gqa=True), n, not long)
            rec["int8_ms"] = median_ms(lambda: prefill_cpu.prefill_attention(q, k, v, d**-0.5).to(torch.bfloat16),
                                       n, not long)
            print(rec, flush=True)
            recs.append(rec)
    return recs


def forward_rows(model, ids: torch.Tensor, lengths: list[int], threads: list[int], reps: int) -> list[dict]:
    recs = []
    for t in lengths:
        x = ids[None, :t]
        for th in threads:
            torch.set_num_threads(th)
            rec = {"tokens": t, "threads": th}
            for prefill in ("sdpa", "int8"):
                kvquant.wrap(model, prefill=prefill)
                with torch.no_grad():
                    rec[f"{prefill}_ms"] = median_ms(lambda: model(x, use_cache=False), reps, warm=t < 8192)
            kvquant.unwrap(model)
            print(rec, flush=True)
            recs.append(rec)
    return recs


def perplexity_rows(model, windows) -> tuple[dict[str, PplRow], tuple[float, float], float]:
    """The rows' perplexity tables on ``windows`` (KLD from ``fp``), the paired per-token NLL
    difference of ``int8`` less ``int8-simulated`` in % of perplexity (mean, standard error), and the
    KLD of ``int8`` from ``int8-simulated``."""

    def run(prefill: str, attention, x: torch.Tensor) -> torch.Tensor:
        kvquant.wrap(model, prefill=prefill)
        with mock.patch.object(prefill_cpu, "prefill_attention", attention), torch.no_grad():
            out = model(x, use_cache=False).logits[0, :-1]
        kvquant.unwrap(model)
        return out

    rows = {"fp": ("sdpa", prefill_cpu.prefill_attention), "int8": ("int8", prefill_cpu.prefill_attention),
            "int8-simulated": ("int8", prefill_cpu.reference_attention)}
    nll = {name: [] for name in rows}
    seconds = dict.fromkeys(rows, 0.0)
    agree = {name: Agreement() for name in rows}
    kernel_vs_sim = Agreement()
    for row in tqdm(windows.ids, desc="windows", unit="window"):
        x = row[None]
        lps = {}
        for name, (prefill, attention) in rows.items():
            t0 = time.perf_counter()
            logits = run(prefill, attention, x)
            seconds[name] += time.perf_counter() - t0
            lps[name] = log_probs(logits)
            nll[name].append(-lps[name].gather(-1, x[0, 1:, None])[:, 0].double())
            if name == "fp":
                agree[name].add_same(logits.shape[0])
            else:
                agree[name].add(lps["fp"], logits)
        kernel_vs_sim.add(lps["int8-simulated"], lps["int8"])
    full = 8.0 * next(model.parameters()).element_size()
    table = {}
    for name, parts in nll.items():
        per_token = torch.cat(parts)
        kld = agree[name].summary()
        table[name] = PplRow(name, math.exp(float(per_token.mean())), float(per_token.mean()), per_token.numel(),
                             full if name == "fp" else 8.25, seconds[name], kld=kld[0], kld_p99=kld[1], top1=kld[2])
    diff = torch.cat(nll["int8"]) - torch.cat(nll["int8-simulated"])
    paired = (100 * float(diff.mean()), 100 * float(diff.std() / math.sqrt(diff.numel())))
    return table, paired, kernel_vs_sim.summary()[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="enwiki-excerpt")
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--forward-lengths", default="2048,8192")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-markdown", action="store_true")
    args = ap.parse_args(argv)
    ok, why = prefill_cpu.available()
    if not ok:
        raise SystemExit(f"the prefill kernel does not build here: {why}")
    threads = [int(x) for x in args.threads.split(",")]
    started = time.strftime("%Y-%m-%d")
    command = "python eval/prefill_int8.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    attn = attention_rows([int(x) for x in args.lengths.split(",")], threads, args.reps)
    model, tok = load_model(args.model, dtype=args.dtype)
    dtype = next(model.parameters()).dtype
    text = load_text(args.dataset, split="test")
    longest = max(int(x) for x in args.forward_lengths.split(","))
    ids = make_windows(tok, text, longest, 1, from_end=False).ids[0]
    fwd = forward_rows(model, ids, [int(x) for x in args.forward_lengths.split(",")], threads, max(1, args.reps - 1))
    torch.set_num_threads(max(threads))
    windows = make_windows(tok, text, args.seqlen, args.windows, from_end=False)
    ppl, paired, kld_sim = perplexity_rows(model, windows)

    lines = [f"## Prefill attention with Q·Kᵀ from INT8 codes, against SDPA ({started})", "",
             f"Command: `{command.strip()}` — {platform_line()}; the kernel's "
             f"{'AVX-512 VNNI / BF16' if prefill_cpu.vnni() else 'portable C'} path. Queries and keys (the keys less their mean, "
             "each channel's range balanced between the two sides) as INT8 per token with an fp16 scale (8.25 bits per entry), exact int32 dot products, softmax in float32, "
             "probabilities and values in bf16 (`kvquant/kernels/prefill_cpu.py`).", "",
             "(a) One causal attention call, SmolLM2-135M's geometry (9 query / 3 KV heads, head_dim 64), random bf16 "
             f"q, k, v, batch 1; median of {args.reps} runs (one from 16384 tokens on), milliseconds:", "",
             "| tokens | threads | SDPA bf16 | SDPA fp32 | int8 codes | speed-up vs SDPA bf16 | vs SDPA fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in attn:
        lines.append(f"| {r['tokens']} | {r['threads']} | {r['sdpa_bf16_ms']:.1f} | {r['sdpa_fp32_ms']:.1f} | "
                     f"{r['int8_ms']:.1f} | {r['sdpa_bf16_ms'] / r['int8_ms']:.2f}× | {r['sdpa_fp32_ms'] / r['int8_ms']:.2f}× |")
    lines += ["", f"(b) A whole forward of `{args.model}` in {str(dtype).removeprefix('torch.')}, no cache, the first "
              f"tokens of `{args.dataset}` (seconds; median of {max(1, args.reps - 1)}):", "",
              "| tokens | threads | SDPA | int8 codes | speed-up |", "|---|---|---|---|---|"]
    for r in fwd:
        lines.append(f"| {r['tokens']} | {r['threads']} | {r['sdpa_ms'] / 1e3:.2f} | {r['int8_ms'] / 1e3:.2f} | "
                     f"{r['sdpa_ms'] / r['int8_ms']:.2f}× |")
    lines += ["", f"(c) Perplexity, `{args.model}` in {str(dtype).removeprefix('torch.')}, the first {args.windows} windows "
              f"of {args.seqlen} tokens of `{args.dataset}`, one forward per window (every position attends as in a "
              "prefill); bits: per query and key entry in the product:", "", format_table(ppl)]
    sim, real = ppl["int8-simulated"].ppl, ppl["int8"].ppl
    lines += ["", f"The kernel's perplexity differs from the simulated path's by {100 * (real / sim - 1):+.3f}% "
              f"(per-token NLL difference, paired: {paired[0]:+.3f}% ± {paired[1]:.3f}% standard error); the KLD of the "
              f"kernel's row from the simulated path's is {kld_sim:.5f}. The two agree per call to float rounding "
              "(tests/test_prefill_int8.py); through 30 layers a rounding difference can move an INT8 code of a later "
              "layer, so the rows differ as two draws of the same quantization noise do."]
    body = "\n".join(lines) + "\n"
    print(body)
    out = ROOT / "out" / "prefill_int8.json"
    out.parent.mkdir(exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps({"command": command, "attention": attn, "forward": fwd,
                                         "ppl": {k: v.to_dict() for k, v in ppl.items()},
                                         "paired_pct": paired, "kld_kernel_vs_simulated": kld_sim}, indent=1, default=str))
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", "prefill-int8", body)


if __name__ == "__main__":
    main()
