"""Decode speed and memory of kvquant's KV cache against transformers' DynamicCache, all rows in one run.

(a) CPU (always): the real offline model in ``--dtype`` (default ``auto``: bfloat16 as shipped, float32
    on a CPU without bfloat16 instructions), a prompt
    from the start of the corpus (disjoint from the codebook file's calibration windows) prefilled
    once per row and context at batch 1 and repeated to each batch size
    (``Cache.batch_repeat_interleave``), then ``--steps`` greedy decoding steps timed one by one
    (median), on each thread count of ``--threads``. Rows (``--rows``): ``fp`` transformers'
    DynamicCache in the model dtype (the reference), generation-mode codebook rows as ``kvquant
    eval-ppl --mode generation`` names them (the file's own method, ``METHOD@K/V``), and
    ``ROW:dequantize`` — the same cache decoded by dequantizing every held token first.
    Memory per row: the KV bytes the cache holds, and the step transient — how far the process's
    peak resident memory rises above its resident memory before the steps (``VmHWM`` reset through
    ``/proc/self/clear_refs``, glibc's free memory trimmed first). Bytes read per step (weights +
    KV held) against the copy bandwidth measured in the same run.
(b) GPU (only with CUDA and triton, ``--gpu``): one decode step of attention, Llama-3-8B-like
    heads (32 query / 8 KV, head_dim 128), keys at 4 bits per channel in groups of 128 with 8-bit
    scales, values 4-bit per token, batch 1 and 8, contexts 4k–128k: fp16 SDPA on an fp16 cache
    vs :func:`kvquant.kernels.triton_decode.decode_step`, with the bytes each reads and a measured copy
    bandwidth.

Usage:  python eval/bench_decode.py --codebooks out/default.safetensors [--dtype auto]
            [--contexts 2048,8192,32768] [--batches 1,8] [--steps 8] [--threads 1,2]
            [--rows fp,lambda-lloyd,...] [--gpu]
Prints markdown tables, writes out/bench_decode.json, docs/decode_speed.png (``plot`` extra) and
the ``decode`` section of BENCHMARKS.md (``--no-markdown``: print only).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

import torch
from heldout import codebook_parser, load  # eval/ (the script's folder) is on sys.path

import kvquant
from kvquant.hf.compat import cache_kwargs
from kvquant.io.data import held_out_windows
from kvquant.io.fileio import atomic_path, replace_section, write_text
from kvquant.evaluation.generation import cache_factories, kv_bits
from kvquant.evaluation.perplexity import make_rows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = "fp,lambda-lloyd"


# --------------------------------------------------------------------------------------------
# (a) CPU
# --------------------------------------------------------------------------------------------


def _rss(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS


def _held_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


@torch.no_grad()
def prefill(model, prompt, cache) -> torch.Tensor:
    """Fill ``cache`` with ``prompt`` (1, P); the greedy next token (1, 1)."""
    return model(prompt, **cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def greedy_step(model, cache, token) -> tuple[torch.Tensor, float, int]:
    """One greedy step: the next token, its seconds, and the peak resident growth during it."""
    _reset_peak()
    before = _rss("VmRSS")
    t0 = time.perf_counter()
    logits = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    seconds = time.perf_counter() - t0
    return logits.argmax(-1, keepdim=True), seconds, _rss("VmHWM") - before


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """This machine's copy bandwidth in bytes/s on the current torch threads: the best of ``reps``
    copies of an ``nbytes`` buffer (read + write counted), the ceiling a memory-bound step reads at."""
    src, dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def cpu_rows(args, books, model, prompt_ids, names: list[str]) -> list[dict]:
    """One dict per (context, batch, threads, row). Per context every row's cache is prefilled (batch
    1, ``--prefill-threads``) and copied to each batch size; the rows then take their decoding steps
    in turn (round robin), on each of ``args.threads`` (int or list of ints) thread counts, so that
    a slow spell of the machine hits every row alike."""
    rows = make_rows(list(dict.fromkeys(n.split(":")[0] for n in names)), books, seqlen=books.calibration["seqlen"],
                     generation=True)  # METHOD@K/V rows: the budget allocated as for the file's calibration seqlen
    factories = cache_factories(model, rows)
    for name in names:
        if name.partition(":")[2] not in ("", "dequantize"):
            raise ValueError(f"row {name!r}: only ':dequantize' may follow a row name")
    kvquant.unwrap(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    thread_counts = [args.threads] if isinstance(args.threads, int) else list(args.threads)

    def run(name: str, fn, *a):
        """``fn(model, *a)``, the model plain (transformers' caches) or wrapped (kvquant's hook:
        positions for pre-RoPE keys, steps routed to the codes)."""
        if name != "fp":
            kvquant.wrap(model, None)
        try:
            return fn(model, *a)
        finally:
            if name != "fp":
                kvquant.unwrap(model)

    out = []
    for context in args.contexts:
        prompt = prompt_ids[:, :context]
        torch.set_num_threads(args.prefill_threads)
        caches, first = {}, {}
        for name in names:
            row, _, how = name.partition(":")
            cache = factories[row]()
            kvquant.unwrap(model)  # make_cache wraps; run() wraps where the row needs it
            if how == "dequantize":
                for layer in cache.layers:
                    layer.reads_codes = False
            first[name] = run(name, prefill, prompt, cache)
            caches[name] = cache
        for batch in args.batches:
            live = {n: copy.deepcopy(c) for n, c in caches.items()} if batch > 1 else caches
            if batch > 1:
                for c in live.values():
                    c.batch_repeat_interleave(batch)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                token = {n: first[n].repeat(batch, 1) for n in names}
                held = {n: _held_bytes(live[n]) for n in names}  # before the steps: each row reads this much KV
                times = {n: [] for n in names}
                transient = dict.fromkeys(names, 0)
                for _ in range(args.steps):
                    for n in names:
                        token[n], sec, grow = run(n, greedy_step, live[n], token[n])
                        times[n].append(sec)
                        transient[n] = max(transient[n], grow)
                for n in names:
                    c = live[n]
                    med = sorted(times[n])[len(times[n]) // 2]
                    bits, _ = kv_bits(c)
                    rec = dict(context=context, batch=batch, threads=threads, row=n, tok_s=batch / med,
                               step_ms=1e3 * med, kv_bytes=_held_bytes(c), transient_bytes=transient[n], kv_bits=bits,
                               read_bytes=held[n] + weight_bytes, reads_codes=bool(getattr(c, "reads_codes",
                                                                                           lambda: False)()))
                    out.append(rec)
                    print(json.dumps(rec), flush=True)
                # the steps grew each cache: crop back so the next thread count starts where this one did
                for c in live.values():
                    c.crop(-args.steps)
            del live
            gc.collect()
        del caches
        gc.collect()
    return out


def cpu_table(recs: list[dict], args, bandwidth: dict[int, float]) -> str:
    ref = {(r["context"], r["batch"], r["threads"]): r for r in recs if r["row"] == "fp"}
    lines = [
        f"### (a) CPU decode: `{args.model}` in {args.dtype}, median of {args.steps} steps after a prompt of the "
        f"context length (start of `{args.dataset}`, held out from the file's calibration); "
        f"{platform_line()}; copy bandwidth "
        + ", ".join(f"{bw / 1e9:.1f} GB/s on {t} thread(s)" for t, bw in sorted(bandwidth.items())),
        "",
        "| context | batch | threads | cache | bits per K/V entry held (end) | decode tok/s | vs DynamicCache "
        "| KV held MiB | step transient MiB | KV + transient vs DynamicCache | bytes read / step (weights + KV) MiB "
        "| read rate / copy bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        key = (r["context"], r["batch"], r["threads"])
        mem = r["kv_bytes"] + r["transient_bytes"]
        f = ref.get(key)
        vs_mem = f"{mem / (f['kv_bytes'] + f['transient_bytes']):.2f}×" if f else "–"
        ratio = f"{r['tok_s'] / f['tok_s']:.2f}×" if f else "–"
        name = r["row"] + (" (codes)" if r["reads_codes"] else "") if r["row"] != "fp" else "DynamicCache"
        rate = r["read_bytes"] / (r["step_ms"] / 1e3) / bandwidth[r["threads"]]
        lines.append(f"| {r['context']} | {r['batch']} | {r['threads']} | {name} | {r['kv_bits']:.2f} | "
                     f"{r['tok_s']:.2f} | {ratio} | {r['kv_bytes'] / 2**20:.1f} | {r['transient_bytes'] / 2**20:.1f} | "
                     f"{vs_mem} | {r['read_bytes'] / 2**20:.0f} | {100 * rate:.0f}% |")
    lines += ["", "`(codes)`: decoding steps read attention from the codes (`kvquant.kernels.dispatch`, the C kernel "
              "`kvquant/kernels/csrc/decode_cpu.c`); `:dequantize`: the same cache dequantizing every held token per step. "
              "DynamicCache: transformers' cache in the model dtype. Bits held: every byte the cache holds per K/V "
              "entry after the steps (scales, exact sink and newest group, rotation tables included). Step transient: "
              "how far peak resident memory rose during a step. Bytes read per step: the model's weights plus the "
              "KV bytes held (a lower bound on what a step reads); read rate: those bytes over the step time, against "
              "the machine's copy bandwidth (read + write of a 1 GiB buffer) on the same threads."]
    return "\n".join(lines) + "\n"


def plot(recs: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no plot: matplotlib is not installed — pip install -e '.[plot]')"
    batches = sorted({r["batch"] for r in recs})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for row in dict.fromkeys(r["row"] for r in recs):
            pts = sorted((r["context"], r["tok_s"]) for r in recs if r["row"] == row and r["batch"] == batch)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return f"![decode tokens/s against context]({path.relative_to(ROOT).as_posix()})"


# --------------------------------------------------------------------------------------------
# (b) GPU
# --------------------------------------------------------------------------------------------


def _time_cuda(fn, iters: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` over CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def synthetic_layer(batch: int, context: int, hkv: int, d: int, device, group: int = 128, bits: int = 4):
    """A KV cache layer holding ``context`` random tokens in the deployed layout: keys at ``bits``
    per channel (uniform levels) in groups of ``group`` with 8-bit scales, values ``bits`` per token."""
    from kvquant.cache import CacheOptions, KVQuantLayer, LayerTables

    levels = 2**bits
    c = torch.linspace(-1, 1, levels)
    centers = c.expand(hkv, d, levels).contiguous()
    bounds = ((c[1:] + c[:-1]) / 2).expand(hkv, d, levels - 1).contiguous()
    tables = LayerTables(centers, bounds, torch.zeros(hkv, d), torch.ones(hkv, d), c, (c[1:] + c[:-1]) / 2,
                         torch.full((hkv, d), levels))
    layer = KVQuantLayer(tables, CacheOptions(bits, bits, group=group, scale_bits=8))
    g = torch.Generator(device=device).manual_seed(0)
    step = 8192
    for s in range(0, context, step):
        n = min(step, context - s)
        layer.update(torch.randn(batch, hkv, n, d, device=device, generator=g),
                     torch.randn(batch, hkv, n, d, device=device, generator=g))
    return layer


def gpu_section(contexts: list[int], batches: list[int], h: int = 32, hkv: int = 8, d: int = 128) -> str:
    if not torch.cuda.is_available():
        return "### (b) GPU decode attention\n\nNo CUDA device in this run: no GPU figures.\n"
    import torch.nn.functional as F

    from kvquant.kernels import triton_decode

    ok, why = triton_decode.available()
    if not ok:
        return f"### (b) GPU decode attention\n\nTriton unavailable: {why}\n"
    dev = torch.device("cuda")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (_time_cuda(lambda: dst.copy_(src), iters=20) * 1e-3)
    src = dst = None  # noqa: F841 (free the buffers)
    lines = [
        "### (b) GPU decode attention (one query token per row)", "",
        f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton_decode.triton.__version__}, "
        f"measured copy bandwidth {bw / 1e12:.2f} TB/s; {h} q / {hkv} KV heads, head_dim {d}; keys 4-bit per channel "
        "in groups of 128 (8-bit scales), values 4-bit per token (8-bit scales)", "",
        "| batch | context | fp16 SDPA ms | kvquant Triton ms | speed-up | fp16 bytes read | kvquant bytes read "
        "| kvquant GB/s | % of copy bw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in batches:
        for s in contexts:
            try:
                layer = synthetic_layer(batch, s, hkv, d, dev)
                q = torch.randn(batch, h, 1, d, device=dev, dtype=torch.float16)
                k16 = torch.randn(batch, hkv, s, d, device=dev, dtype=torch.float16)
                v16 = torch.randn_like(k16)
                t_fp = _time_cuda(lambda: F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True))
                t_q = _time_cuda(lambda: triton_decode.decode_step(layer, q, None, None, 0))
                fp_bytes = 2 * k16.numel() * 2
                q_bytes = layer.memory_bytes()
                lines.append(f"| {batch} | {s} | {t_fp:.3f} | {t_q:.3f} | {t_fp / t_q:.2f}× | {fp_bytes / 2**20:.0f} MiB "
                             f"| {q_bytes / 2**20:.0f} MiB | {q_bytes / (t_q * 1e-3) / 1e9:.0f} | "
                             f"{q_bytes / (t_q * 1e-3) / bw:.0%} |")
                layer = k16 = v16 = None  # noqa: F841 (free before the next size)
                torch.cuda.empty_cache()
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {batch} | {s} | out of memory | | | | | | |")
                torch.cuda.empty_cache()
    return "\n".join(lines) + "\n"


def platform_line() -> str:
    import platform

    sys.path.insert(0, str(ROOT / "scripts"))
    from platform_info import cpu_model

    return (f"{platform.machine()} {cpu_model()} (torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> None:
    ap = codebook_parser(__doc__)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                    help="the model's dtype (default auto, as `kvquant --dtype auto`: bfloat16 as the offline models "
                         "ship, float32 on a CPU without bfloat16 instructions)")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", default="1,2", help="torch (and kernel) thread counts while decoding")
    ap.add_argument("--prefill-threads", type=int, default=2)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--gpu", action="store_true", help="also (b), on CUDA")
    ap.add_argument("--gpu-contexts", default="4096,16384,32768,65536,131072")
    ap.add_argument("--no-markdown", action="store_true",
                    help="print only: write neither BENCHMARKS.md nor out/bench_decode.json nor docs/decode_speed.png")
    args = ap.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if names[:1] != ["fp"]:
        raise ValueError("--rows must start with fp (the reference of the ratios)")
    t0 = time.perf_counter()
    books, model, tok, text = load(args, dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    args.dtype = str(model.dtype).removeprefix("torch.")
    prompt = held_out_windows(tok, text, max(args.contexts), 1, books.calibration).ids[:1]
    bandwidth = {}
    for t in args.threads:
        torch.set_num_threads(t)
        bandwidth[t] = copy_bandwidth()
    recs = cpu_rows(args, books, model, prompt, names)
    cmd = "python eval/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = ["## Decode speed and memory\n", f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')})\n",
             cpu_table(recs, args, bandwidth)]
    if not args.no_markdown:
        parts.append(plot(recs, ROOT / "docs" / "decode_speed.png"))
    if args.gpu:
        parts.append(gpu_section([int(c) for c in args.gpu_contexts.split(",")], args.batches))
    else:
        parts.append("### (b) GPU decode attention\n\nNot run here (`--gpu` on a CUDA machine with triton): "
                     "the Triton kernel is tested only under `TRITON_INTERPRET=1` on the CPU so far.\n")
    parts.append(f"_total {time.perf_counter() - t0:.0f} s_")
    md = "\n".join(parts)
    print(md)
    if not args.no_markdown:
        write_text(ROOT / "out" / "bench_decode.json", json.dumps(dict(command=cmd, bandwidth=bandwidth, rows=recs),
                                                                 indent=1))
        replace_section(ROOT / "BENCHMARKS.md", "decode", md)


if __name__ == "__main__":
    main()
