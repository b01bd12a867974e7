"""Same-model comparison with transformers' own quantized KV cache (issue 5).

transformers' ``QuantizedCache`` (backends ``quanto`` = optimum-quanto, ``hqq`` = HQQ, and the
dependency-free ``fp8``) quantizes the keys AND values it stores; its API has one ``nbits`` for
both and no keys-only mode. It never touches the query side of Q·Kᵀ. kvquant's
:class:`~kvquant.cache.KVQuantCache` (``kvquant.make_cache``) stores keys as codes of the
calibrated key codebooks and values either as codes of its ρ = 0 value codebook or exact;
queries stay exact here too (no wrap), so every row changes only what attention reads back from
the cache.

A quantized cache only acts on attention over *cached* tokens, so perplexity is measured in
generation mode: each window goes through a fresh cache and the NLL of every next token is
summed. Token by token (``--stepwise``, ``_nll_stepwise`` of ``eval/bench_decode.py``) that is
2047 forwards per window, too slow for every row on a 2-core CPU; by default the window is fed in
chunks cut where the cache changes how it returns tokens already seen (``residual_length``
flushes, completed key groups), which with causal attention gives every token exactly what
token-by-token decoding gives it, up to matmul rounding. ``--check N`` decodes the first N
tokens of the first window both ways for every row and reports the difference. The unquantized
reference is the same with transformers' ``DynamicCache``; a full-forward row ties it to
``eval/quality_sweep.py``'s protocol. Same model, same process, same windows for every row:
calibration on the LAST ``--calib`` windows, evaluation on the FIRST ``--windows`` windows of the
corpus (``split_calib_eval``, as in the sweep).

kvquant rows: codebooks from ``CodebookConfig()`` (the library default) and from the preset
``configs/default.yaml`` (the best measured configuration), keys at their bits with values
quantized (K+V, comparable with transformers' rows) or exact (keys only).

Bytes per token are measured: the storage of every tensor the cache holds at the end of the
first window (codes, scales/zero points, exact residual or sink tokens), over the tokens held.

Usage:  python eval/library_cache.py [--model smollm2-135m] [--seqlen 2048] [--calib 8] [--windows 4]
                                     [--backends quanto,hqq,fp8] [--threads 2] [--check 300]
                                     [--stepwise] [--rows ...] [--render]
Needs the ``compare`` extra (``pip install -e ".[compare]"``: optimum-quanto, hqq).
Writes out/library_cache.json and the ``library-cache`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import _nll_stepwise

from kvquant.assets import load_model
from kvquant.cache import make_cache
from kvquant.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig
from kvquant.compat import cache_kwargs
from kvquant.data import load_text, split_calib_eval
from kvquant.fileio import replace_section, write_text
from kvquant.perplexity import nll_sum

#: backend -> (module that must import, PyPI distribution)
BACKENDS = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq"), "fp8": (None, None)}


def require(backends: list[str]) -> None:
    """Exit with a clear message if a requested backend's library is missing."""
    missing = [dist for b in backends for mod, dist in [BACKENDS[b]] if mod and importlib.util.find_spec(mod.split(".")[0])
               is None or mod and importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"eval/library_cache.py needs {', '.join(missing)} for transformers' QuantizedCache: "
                 'pip install -e ".[compare]"  (or leave the backend out with --backends)')


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# bytes held by a cache
# --------------------------------------------------------------------------------------------


def _storages(obj, seen: dict) -> None:
    """Collect the storages behind ``obj``: plain tensors, tensor subclasses that flatten into
    inner tensors (optimum-quanto's QBits tensors), and tuples/lists/dicts of them (HQQ's meta)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            for n in names:
                _storages(getattr(obj, n), seen)
            return
        if obj.numel():
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _storages(o, seen)
    elif isinstance(obj, dict):
        for o in obj.values():
            _storages(o, seen)


def held_bytes(cache) -> dict:
    """Bytes the cache holds (each storage once), tokens held, and the quantized part alone."""
    if hasattr(cache, "memory_bytes"):  # KVQuantCache: its own accounting of every tensor it holds
        held = cache.memory_bytes()
        tokens = cache.get_seq_length()
        return {"bytes": held, "tokens": tokens, "quantized_bytes_per_token": cache.quantized_bytes_per_token()}
    total, quant, q_tokens = {}, {}, 0
    for layer in cache.layers:
        _storages([getattr(layer, "keys", None), getattr(layer, "values", None)], total)
        qk = getattr(layer, "_quantized_keys", None)
        if qk is not None:
            part: dict = {}
            _storages([qk, layer._quantized_values], part)
            quant.update(part)
            total.update(part)
            exact = layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0
            q_tokens = layer.get_seq_length() - exact  # same for every layer
    out = {"bytes": sum(total.values()), "tokens": cache.get_seq_length()}
    if quant:
        out["quantized_bytes_per_token"] = sum(quant.values()) / max(q_tokens, 1)
    return out


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------


def transformers_rows(model, backends: list[str]) -> dict:
    """name -> (factory, what it quantizes, chunk starts) for transformers' caches, settings read
    from the layers."""
    from transformers import DynamicCache, QuantizedCache

    rows = {"DynamicCache (unquantized)": (lambda: DynamicCache(config=model.config),
                                           f"nothing: K and V exact ({next(model.parameters()).dtype})".replace("torch.", ""),
                                           lambda n: set())}
    for backend in backends:
        for nbits in ((4, 2) if backend != "fp8" else (None,)):
            kw = {} if nbits is None else {"nbits": nbits}
            layer = QuantizedCache(backend, model.config, **kw).layers[0]
            name = f"QuantizedCache {backend}" + ("" if nbits is None else f" {nbits}-bit")
            if backend == "fp8":
                what = ("K and V: float8 e4m3 with one scale per layer and tensor, frozen at the first update "
                        "(here the BOS token); no exact residual")
            else:
                group = (f"min–max over groups of {layer.q_group_size} consecutive head_dim channels of one token "
                         "and head (reshape (−1, G))" if backend == "quanto" else
                         f"HQQ-optimised min–max over groups of {layer.q_group_size} elements strided by numel/"
                         f"{layer.q_group_size} through the flattened (B, H, S, D) tensor (reshape (G, −1), reduce dim 0)")
                what = (f"K and V: int{nbits} asymmetric, axis {layer.axis_key}/{layer.axis_value} (K/V), {group}; "
                        f"residual_length {layer.residual_length}: the newest <{layer.residual_length} tokens exact, "
                        "then the whole cache re-quantized from its dequantized values")
            # first update: token 0 quantized; then the residual flushes with tokens R, 2R, … (fp8: never)
            r = None if backend == "fp8" else layer.residual_length
            rows[name] = (lambda b=backend, kw=kw: QuantizedCache(b, model.config, **kw), what,
                          lambda n, r=r: {1} | (set(range(r + 1, n, r)) if r else set()))
    return rows


def probe_hqq_axis1(model, ids: torch.Tensor) -> str | None:
    """The error (if any) of a few decode steps with HQQ at axis 1 (per-token groups, like quanto)."""
    from transformers import QuantizedCache

    try:
        _nll_stepwise(model, ids, QuantizedCache("hqq", model.config, nbits=4, axis_key=1, axis_value=1))
    except Exception as e:  # noqa: BLE001 - reported, not handled
        return f"{type(e).__name__}: {e}"
    return None


def _describe(books, values: str) -> str:
    c = books.config
    norm = {"head": "static offset/scale per head", "channel": "static offset/scale per channel",
            "channel-group": f"dynamic min–max per channel over {c.group} tokens (the incomplete group exact)"}[c.norm]
    sink = f", first {c.sink} token(s) exact" if c.sink else ""
    return f"K: {c.bits_k}-bit `{c.method}` codebook, {norm}{sink}; V: {values}"


def kvquant_rows(model, calib, preset: Path, want=lambda name: True) -> tuple[dict, dict]:
    """name -> (factory, what, chunk starts) for kvquant's cache, and the configs used (only those of rows
    ``want`` accepts are calibrated)."""
    default = CodebookConfig()
    allowed = {f.name for f in fields(CodebookConfig)} - {"version"}
    raw = yaml.safe_load(preset.read_text()) or {}
    preset_cfg = CodebookConfig(**{k: v for k, v in raw.items() if k in allowed and k not in ("outliers", "rope")})
    configs = {"CodebookConfig()": default}
    if preset_cfg != default:
        configs[str(preset.relative_to(ROOT)) if preset.is_relative_to(ROOT) else str(preset)] = preset_cfg
    rows, used = {}, {}
    for label, cfg in configs.items():
        b = cfg.bits_k
        names = {"kv": f"kvquant {label} K{b} V{b}", "k": f"kvquant {label} K{b}, V exact"}
        if label != "CodebookConfig()" and b != 2:
            names["kv2"] = f"kvquant {label} K2 V2"
        names = {k: n for k, n in names.items() if want(n)}
        if not names:
            continue
        books = calibrate(model, calib, CalibrationConfig(cfg), progress=False)
        used[label] = asdict(books.config)
        # group mode: the token completing a group (sink + k·G − 1) sees it quantized, earlier ones exact
        st = (lambda n, c=books.config: set(range(c.sink + c.group - 1, n, c.group))) if books.config.dynamic else (lambda n: set())
        v_q = f"{b}-bit ρ = 0 codebook, fp16 RMS scale per token and head"
        if "kv" in names:
            rows[names["kv"]] = (lambda bk=books: make_cache(model, bk, values="rms"), _describe(books, v_q), st)
        if "k" in names:
            rows[names["k"]] = (lambda bk=books: make_cache(model, bk, quantize_values=False),
                                _describe(books, "exact (keys only)"), st)
        if "kv2" in names:
            books2 = books.rebuilt(bits_q=2, bits_k=2)
            rows[names["kv2"]] = (lambda bk=books2: make_cache(model, bk, values="rms"), _describe(books2, v_q.replace(f"{b}-bit", "2-bit")), st)
    return rows, used


#: longest chunk fed at once (memory of the logits); any finer split gives the same result
MAX_CHUNK = 256


@torch.no_grad()
def nll_chunked(model, ids: torch.Tensor, cache, starts: set[int]) -> float:
    """Mean next-token NLL of ``ids`` (1, n) fed through ``cache`` in chunks that start at
    ``starts`` (and every MAX_CHUNK tokens).

    Equal to token-by-token decoding (``_nll_stepwise``) up to matmul rounding as long as no chunk
    runs past a point where the cache changes how it returns tokens already seen: with causal
    attention, a chunk's token t then reads exactly the keys/values the cache would give it at
    step t. The starts of each row encode those points (``residual_length`` flushes, completed
    key groups); ``--check`` measures the agreement on a prefix."""
    n = ids.shape[1]
    cuts = _cuts(n, starts)
    total = 0.0
    for a, b in itertools.pairwise(cuts):
        logits = model(ids[:, a:b], **cache_kwargs(cache), use_cache=True).logits[0].float()
        target = ids[0, a + 1 : b + 1]
        total += float(F.cross_entropy(logits[: target.numel()], target, reduction="sum").double())
    return total / (n - 1)


def _cuts(n: int, starts: set[int]) -> list[int]:
    return sorted({0, n, *range(0, n, MAX_CHUNK), *(p for p in starts if 0 < p < n)})


def schedule_check(model, factory, starts, n: int) -> float:
    """Max |difference| between the keys/values a fresh cache returns to each of ``n`` random
    tokens fed one at a time and fed in the row's chunks (layer 0; 0.0: the schedule is exact)."""
    cfg = model.config.get_text_config(decoder=True)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    dt = next(model.parameters()).dtype
    k = (torch.randn(1, cfg.num_key_value_heads, n, d, generator=g) * 3
         + torch.randn(1, cfg.num_key_value_heads, 1, d, generator=g)).to(dt)
    v = torch.randn(1, cfg.num_key_value_heads, n, d, generator=g).to(dt)

    def feed(cuts):
        cache, seen = factory(), {}
        for a, b in itertools.pairwise(cuts):
            kk, vv = cache.update(k[:, :, a:b], v[:, :, a:b], 0)
            for t in range(a, b):
                seen[t] = (kk[:, :, : t + 1].clone(), vv[:, :, : t + 1].clone())
        return seen

    one, chunked = feed(list(range(n + 1))), feed(_cuts(n, starts(n)))
    return max(float((one[t][i] - chunked[t][i]).abs().max()) for t in range(n) for i in (0, 1))


def run_row(model, ids: torch.Tensor, factory, starts, stepwise: bool, check: int) -> dict:
    t0 = time.perf_counter()
    total, mem = 0.0, None
    for i in range(ids.shape[0]):
        cache = factory()
        w = ids[i : i + 1]
        nll = _nll_stepwise(model, w, cache) if stepwise else nll_chunked(model, w, cache, starts(w.shape[1]))
        if not math.isfinite(nll):
            raise FloatingPointError("non-finite NLL")
        total += nll * (ids.shape[1] - 1)
        if mem is None:
            mem = held_bytes(cache)
    count = ids.shape[0] * (ids.shape[1] - 1)
    out = {"nll": total / count, "ppl": math.exp(total / count), "tokens": count,
           "bytes_held": mem["bytes"], "tokens_held": mem["tokens"],
           "bytes_per_token": mem["bytes"] / mem["tokens"],
           "quantized_bytes_per_token": mem.get("quantized_bytes_per_token"),
           "seconds": time.perf_counter() - t0}
    if check and not stepwise:
        t1 = time.perf_counter()
        out["schedule_max_abs_diff"] = schedule_check(model, factory, starts, check)
        w = ids[:1, :check]
        out["check"] = {"tokens": int(w.shape[1]), "stepwise_nll": _nll_stepwise(model, w, factory()),
                        "chunked_nll": nll_chunked(model, w, factory(), starts(w.shape[1]))}
        out["check"]["abs_diff"] = abs(out["check"]["stepwise_nll"] - out["check"]["chunked_nll"])
        out["check_seconds"] = time.perf_counter() - t1
    return out


def markdown(p: dict) -> str:
    rows = p["rows"]
    ref = rows["DynamicCache (unquantized)"]["ppl"]
    fp16 = p["fp16_bytes_per_token"]
    out = [
        f"## Same-model comparison with transformers' quantized KV cache (issue 5): {p['model']}, {p['dataset']}",
        "",
        (f"Command: `{p['command']}` — model `{p['model']}` ({p['dtype']}), corpus `{p['dataset']}`, seqlen "
        f"{p['seqlen']}, the first {p['eval_windows']} evaluation windows (the first {p['eval_windows']} of the "
        f"quality sweep's), {p['calib_windows']} calibration windows (end of the corpus), {p['threads']} CPU "
        f"thread(s); transformers {p['versions']['transformers']}, optimum-quanto {p['versions']['optimum-quanto']}, "
        f"hqq {p['versions']['hqq']}, torch {p['versions']['torch']}."),
        "",
        ("Perplexity in **generation mode**: every window goes through a fresh cache, so attention reads the "
        "keys/values the cache gives back. "
        + ("Token by token. " if p["stepwise"] else
           "Fed in chunks cut where the cache changes how it returns tokens already seen (each `residual_length` "
           "flush, each completed key group; at most " + str(p["max_chunk"]) + " tokens), so that with causal "
           "attention every token reads exactly what token-by-token decoding gives it, up to matmul rounding: the "
           "*check* column gives, first, the largest difference between the keys/values a fresh cache returns to "
           "each of " + str(p["check_tokens"]) + " random tokens fed one at a time and fed in the row's chunks "
           "(0 = the schedule is exact), then |Δ mean NLL| (nats) between the two ways on the first "
           + str(p["check_tokens"]) + " tokens of window 1, which is rounding only: a one-token and a many-token "
           "matmul round differently (~1e-6), a value that close to a decision boundary changes code, and coarse "
           "grids (fp8, HQQ 2-bit) pass that on the most. ")
        + "Queries are never quantized here, in any row: transformers' "
        "`QuantizedCache` quantizes stored **keys and values** (one `nbits` for both; its API has no keys-only "
        "mode), not Q·Kᵀ. kvquant's cache rows are given with values quantized (like for like) and exact (keys "
        "only, what kvquant's Q·Kᵀ quantization is about). "
        f"Unquantized full forward (the sweep's protocol) on the same windows: {p['full_forward_ppl']:.3f}."),
        "",
        ("| cache | what it quantizes | ppl | Δ vs unquantized gen-mode | KV bytes/token held, all layers (vs fp16) "
        "| quantized part, bytes/token (vs fp16) | check | s |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        q = r["quantized_bytes_per_token"]
        qcell = "–" if q is None else f"{q:.0f} ({q / fp16:.1%})"
        chk = f"{r['schedule_max_abs_diff']:.0e} · {r['check']['abs_diff']:.1e}" if "check" in r else "–"
        out.append(f"| {name} | {r['what']} | {r['ppl']:.3f} | {r['ppl'] / ref - 1:+.1%} | {r['bytes_per_token']:.0f} "
                   f"({r['bytes_per_token'] / fp16:.1%}) | {qcell} | {chk} | {r['seconds']:.0f} |")
    out += [
        "",
        (f"Bytes: the storage of every tensor each cache holds at the end of the first window "
        f"({rows['DynamicCache (unquantized)']['tokens_held']} tokens held), over the tokens held; an fp16 K+V cache "
        f"would hold {fp16} bytes/token ({p['layers']} layers × {p['kv_heads']} KV heads × head_dim {p['head_dim']} "
        "× 2 × 2 bytes). The model runs in float32, so exact tokens cost twice fp16 and quanto/HQQ keep their scale "
        "and zero point in float32 too (they follow the cache dtype). The quantized part excludes exact tokens; for "
        "kvquant it is its own accounting (`quantized_bytes_per_token`: codes + group mid/half + value scales); "
        "kvquant's static tables (centers, boundaries, offsets) are per model and not counted."),
        "",
        f"residual_length (transformers' default {p['residual_length']}): the first token is quantized on the first "
        f"update, then new tokens stay exact until {p['residual_length']} have gathered, when everything is "
        "re-quantized from the dequantized cache plus the exact tokens, so at any step between 0 and "
        f"{p['residual_length'] - 1} of the most recent tokens are exact. kvquant's channel-group keys behave alike "
        "(the incomplete group of up to G − 1 tokens stays exact); its static-normalisation rows quantize every "
        "token at once. "
        + (f"HQQ with axis 1 (groups along head_dim, per token and head like quanto) fails here in generation mode: "
           f"`{p['hqq_axis1']}` (its 4-bit packing pairs group rows, and one token of "
           f"{p['kv_heads']} KV heads is {p['kv_heads']} rows), so HQQ runs with its default axis 0. " if p.get("hqq_axis1") else "")
        + ("kvquant codebooks: " + "; ".join(f"{k}: `{v['method']}`, norm `{v['norm']}`, group {v['group']}, "
                                             f"sink {v['sink']}, rope {v.get('rope', 'post')}"
                                             for k, v in p["kvquant_configs"].items())
           + " (KVQuantCache stores post-RoPE keys, so a preset's `rope: pre` is not used here). "
           if p["kvquant_configs"] else "")
        + "s: wall seconds of the row over all windows (check not included), on a shared 2-core machine.",
    ]
    if p.get("note"):
        out += ["", p["note"]]
    out += ["", f"_total {p['seconds']:.0f} s_"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="enwiki-excerpt")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows (end of corpus)")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows (start of corpus)")
    ap.add_argument("--backends", default="quanto,hqq,fp8", help="transformers QuantizedCache backends")
    ap.add_argument("--preset", default=str(ROOT / "configs" / "default.yaml"), help="second kvquant configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stepwise", action="store_true", help="feed every window token by token (slow on a CPU)")
    ap.add_argument("--check", type=int, default=300,
                    help="tokens of window 1 decoded both token by token and in chunks, per row (0: skip)")
    ap.add_argument("--rows", default="", help="comma-separated substrings: run only matching rows (+ the reference)")
    ap.add_argument("--note", default="", help="a sentence added to the markdown (e.g. why fewer windows)")
    ap.add_argument("--no-markdown", action="store_true", help="do not write out/ or BENCHMARKS.md")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the BENCHMARKS.md section from out/library_cache.json (no measurement)")
    args = ap.parse_args(argv)
    if args.render:
        md = markdown(json.loads((ROOT / "out" / "library_cache.json").read_text()))
        print(md)
        replace_section(ROOT / "BENCHMARKS.md", "library-cache", md)
        return
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        ap.error(f"unknown backend(s) {sorted(unknown)}; choose from {sorted(BACKENDS)}")
    require(backends)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    calib, evals = split_calib_eval(tok, load_text(args.dataset), args.seqlen, args.calib, args.windows, source=args.dataset)
    total, count = nll_sum(model, evals.ids, progress=False)
    full_ppl = math.exp(total / count)
    print(f"full forward, unquantized: ppl {full_ppl:.3f}", flush=True)
    keep = [s for s in args.rows.split(",") if s]

    def want(name: str) -> bool:
        return not keep or name.startswith("DynamicCache") or any(s in name for s in keep)

    rows = transformers_rows(model, backends)
    kv, configs = kvquant_rows(model, calib, Path(args.preset).resolve(), want)
    rows.update(kv)
    rows = {n: r for n, r in rows.items() if want(n)}
    hqq_axis1 = probe_hqq_axis1(model, evals.ids[:1, :4]) if "hqq" in backends else None
    results = {}
    for name, (factory, what, starts) in rows.items():
        r = run_row(model, evals.ids, factory, starts, args.stepwise, args.check)
        r["what"] = what
        results[name] = r
        print(f"{name}: ppl {r['ppl']:.3f}, {r['bytes_per_token']:.0f} B/token, {r['seconds']:.0f} s"
              + (f", check |Δ NLL| {r['check']['abs_diff']:.1e}" if "check" in r else ""), flush=True)
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    command = "python eval/library_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "command": command.strip(), "model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
        "calib_windows": calib.n, "eval_windows": evals.n, "bos_prepended": evals.bos_prepended,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "optimum-quanto", "hqq")},
        "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim,
        "fp16_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2,
        "residual_length": _default_residual(),
        "full_forward_ppl": full_ppl, "stepwise": args.stepwise, "max_chunk": MAX_CHUNK,
        "check_tokens": min(args.check, args.seqlen), "hqq_axis1": hqq_axis1, "kvquant_configs": configs, "note": args.note,
        "rows": results, "seconds": time.perf_counter() - t0,
    }
    if not args.no_markdown:
        write_text(ROOT / "out" / "library_cache.json", json.dumps(payload, indent=1))
    md = markdown(payload)
    print(md)
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", "library-cache", md)


def _default_residual() -> int:
    """transformers' default ``residual_length`` of the group-wise backends (read, not assumed)."""
    import inspect

    from transformers.cache_utils import QuantizedLayer

    return inspect.signature(QuantizedLayer.__init__).parameters["residual_length"].default


if __name__ == "__main__":
    main()
