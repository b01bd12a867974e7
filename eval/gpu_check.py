"""The one prepared GPU check: what a user with a GPU runs, checked and timed in one script that
installs nothing (torch, transformers, triton and kvquant as they are on the machine).

(a) the Triton kernel's tests (tests/test_code_attention.py, ``-k triton``: under Triton's
    interpreter against the C path, as on any machine — that the installed triton agrees);
(b) ``generate()`` through ``make_cache`` — whose one-token steps the Triton kernel reads on CUDA —
    on a SmolLM2-135M-like and a Llama-3-8B-like geometry (random weights; 4 layers of the 8B) with
    pre-RoPE group codebooks calibrated on random tokens, against ``decode="dequantize"`` (the
    reference): tokens equal, largest score difference, and that every step was read from codes;
(c) decode attention, one query token per row, 32 q / 8 KV heads, head_dim 128: the 4-bit cache
    through the Triton kernel vs fp16 ``scaled_dot_product_attention`` (the FlashAttention-style
    fused kernel) at batch 1 and 8, 4k–128k tokens, with the bytes each reads and the bandwidth
    against a measured device copy (eval/bench_decode.py's section).

``--tiny`` runs the same steps on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set
before Python starts) at tiny sizes, to show the script itself works; its timings mean nothing.

Usage:  python eval/gpu_check.py [--tiny]     (about 5 minutes on an H100/H200)
Writes out/gpu_check.json and out/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT / "tests"))

GEOMETRIES = {  # (layers, hidden, heads, kv heads, head_dim, vocab); the 8B-like one cut to 4 layers
    "smollm2-135m-like": (30, 576, 9, 3, 64, 49152),
    "llama3-8b-like (4 of 32 layers)": (4, 4096, 32, 8, 128, 128256),
}
TINY = {"tiny-llama": (2, 64, 4, 2, 16, 128)}


def kernel_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_code_attention.py",
                           "-k", "triton"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def generate_check(name: str, geometry: tuple, device: torch.device, prompt: int, new: int, group: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvquant.cache import make_cache
    from kvquant.hf.calibrate import CalibrationConfig, calibrate
    from kvquant.codebooks import CodebookConfig
    from kvquant.hf.compat import cache_kwargs

    layers, hidden, heads, kv, d, vocab = geometry
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=d, max_position_embeddings=4 * prompt)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, vocab, (2, 2 * group), generator=g).to(device)
    books = calibrate(model, calib, CalibrationConfig(CodebookConfig("lambda", 4, 4, norm="channel-group", group=group,
                                                                      sink=1, scale_bits=8, rope="pre")), progress=False)
    ids = torch.randint(0, vocab, (2, prompt), generator=g).to(device)
    runs = {}
    for kind, kw in (("codes", {"kernel": "triton"}), ("dequantize", {"decode": "dequantize"})):
        cache = make_cache(model, books, **kw)
        stepped = []
        for layer in cache.layers:
            real = layer.decode_attention
            layer.decode_attention = lambda *a, real=real: (stepped.append(1), real(*a))[1]
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **cache_kwargs(cache),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        runs[kind] = (out.sequences, torch.stack(out.scores).float(), len(stepped), time.perf_counter() - t0,
                      cache.layers[0]._step_kernel)
    from transformers import DynamicCache

    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **cache_kwargs(DynamicCache(config=cfg)),
                   max_new_tokens=new, min_new_tokens=new, do_sample=False)
    t_dynamic = time.perf_counter() - t0
    (a, sa, na, ta, kernel), (b, sb, _, tb, _) = runs["codes"], runs["dequantize"]
    finite = torch.isfinite(sb)
    return {"geometry": name, "kernel": getattr(getattr(kernel, "func", kernel), "__module__", None),
            "tokens_equal": bool(torch.equal(a, b)), "max_score_diff": float((sa - sb)[finite].abs().max()),
            "steps_from_codes": na, "expected_steps": (new - 1) * layers, "seconds_codes": ta, "seconds_dequantize": tb,
            "seconds_dynamic_cache": t_dynamic}


def attention_timing(device: torch.device, contexts: list[int], batches: list[int], h: int, hkv: int, d: int) -> str:
    if device.type == "cuda":
        from bench_decode import gpu_section

        return gpu_section(contexts, batches, h, hkv, d)
    import torch.nn.functional as F
    from bench_decode import synthetic_layer

    from kvquant.kernels import triton_decode

    lines = ["### (c) decode attention on the CPU under Triton's interpreter (tiny sizes: the path works; "
             "timings mean nothing)", "", "| batch | context | max |Triton − SDPA on the dequantized cache| |", "|---|---|---|"]
    for batch in batches:
        for s in contexts:
            layer = synthetic_layer(batch, s, hkv, d, device, group=16)
            q = torch.randn(batch, h, 1, d)
            k, v = layer._materialize()
            ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
            got = triton_decode.decode_step(layer, q, None, None, 0, block_t=16)
            lines.append(f"| {batch} | {s} | {float((got - ref).abs().max()):.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the CPU under TRITON_INTERPRET=1, tiny sizes")
    args = ap.parse_args()
    from kvquant.kernels import triton_decode
    from kvquant.io.fileio import write_text

    ok, why = triton_decode.available()
    if not ok:
        raise SystemExit(f"gpu_check: the Triton kernel cannot run here: {why}")
    device = torch.device("cpu" if args.tiny else "cuda")
    name = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name(device)
    report = {"device": name, "torch": torch.__version__, "triton": triton_decode.triton.__version__}
    report["kernel_tests"] = kernel_tests()
    geometries, (prompt, new, group) = (TINY, (40, 6, 16)) if args.tiny else (GEOMETRIES, (4096, 16, 128))
    report["generate"] = [generate_check(n, g, device, prompt, new, group) for n, g in geometries.items()]
    contexts, batches, shape = ([32, 64], [1, 2], (4, 2, 16)) if args.tiny else (
        [4096, 16384, 32768, 65536, 131072], [1, 8], (32, 8, 128))
    timing = attention_timing(device, contexts, batches, *shape)
    lines = [f"# GPU check: {name}", "", f"torch {report['torch']}, triton {report['triton']}", "",
             f"(a) kernel tests: {report['kernel_tests']['summary']} (exit {report['kernel_tests']['returncode']})", "",
             "(b) generate() through make_cache vs decode=\"dequantize\"", "",
             f"(prompt {prompt} tokens, {new} new, batch 2; seconds: the whole generate, prefill included)", "",
             "| geometry | step kernel | tokens equal | max score diff | steps from codes | s (codes) | s (dequantize) "
             "| s (DynamicCache, model dtype) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["generate"]:
        lines.append(f"| {r['geometry']} | {r['kernel']} | {r['tokens_equal']} | {r['max_score_diff']:.2e} | "
                     f"{r['steps_from_codes']}/{r['expected_steps']} | {r['seconds_codes']:.2f} | {r['seconds_dequantize']:.2f} | "
                     f"{r['seconds_dynamic_cache']:.2f} |")
    lines += ["", timing]
    report["timing_markdown"] = timing
    write_text(ROOT / "out" / "gpu_check.json", json.dumps(report, indent=1))
    write_text(ROOT / "out" / "gpu_check.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
