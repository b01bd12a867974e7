"""kvquant: quantized queries, keys and values for Hugging Face causal LMs, with codebooks from the
optimal point density for products. Run "kvquant COMMAND --help" for a command's options.

Options may also come from a YAML file (--config configs/default.yaml) whose keys are the
long option names with _ for - ; options given on the command line win.
"""

from __future__ import annotations

import argparse

from kvquant.cli.assets import cmd_assets
from kvquant.cli.calibrate import cmd_calibrate
from kvquant.cli.eval_passkey import cmd_eval_passkey
from kvquant.cli.eval_ppl import cmd_eval_ppl
from kvquant.cli.generate import cmd_generate
from kvquant.cli.options import DEFAULTS

#: kvquant.cache.VALUE_NORMS, spelled here so that --help imports no torch
VALUE_CHOICES = ("hadamard", "minmax", "rms")
VALUE_HELP = "value normalisation per token (default hadamard where head_dim is a power of two, else minmax)"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``kvquant CMD: error: …``, exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kvquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="fetch the offline default model and corpus into $KVQUANT_HOME")
    a.add_argument("names", nargs="*", help="asset names (default: all); see --list")
    a.add_argument("--list", action="store_true", help="list the offline asset names")
    a.add_argument("--force", action="store_true",
                   help="delete what the cache holds of these assets and fetch them again (repairs a damaged cache)")
    a.set_defaults(func=cmd_assets)

    def model_options(p):
        p.add_argument("--model", help=f"offline name, local folder or hub id (default {DEFAULTS['model']})")
        p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default auto: the dtype the model ships in, "
                       "bfloat16 for the offline models, where the device computes it natively; float32, with a "
                       "warning, on a CPU without bfloat16/float16 instructions)")
        p.add_argument("--device", help="cpu, cuda, cuda:0 … (default cpu)")
        p.add_argument("--device-map", help="auto | balanced | sequential: place the layers over the GPUs, the CPU and "
                       "disk with accelerate (models larger than one device; replaces --device)")
        p.add_argument("--max-memory", help="with --device-map: memory per device, e.g. 0=20GiB,cpu=8GiB")
        p.add_argument("--offload-folder", help="with --device-map: folder for the layers offloaded to disk")

    def common(p):
        p.add_argument("--config", help="YAML file of options (e.g. configs/default.yaml)")
        model_options(p)
        p.add_argument("--dataset", help=f"corpus name or datasets id (default {DEFAULTS['dataset']})")
        p.add_argument("--text-file", help="a local text file instead of --dataset")
        p.add_argument("--seqlen", type=int, help=f"tokens per window (default {DEFAULTS['seqlen']})")

    c = sub.add_parser("calibrate", help="capture q/k pair statistics and write codebooks")
    common(c)
    c.add_argument("--samples", type=int, help="calibration windows, taken from the END of the text (default 8)")
    c.add_argument("--bits-q", type=int, help="bits per query entry (1-8, default 4); with --budget or "
                   "--effective-bits, the most one channel may get")
    c.add_argument("--bits-k", type=int, help="bits per key entry (1-8, default 4); with --budget or "
                   "--effective-bits, the most one channel may get")
    c.add_argument("--method", choices=["lambda", "lambda-lloyd", "lloydmax", "uniform"], help="codebook method (default lambda-lloyd)")
    c.add_argument("--norm", choices=["head", "channel", "channel-token", "channel-group"],
                   help="static per head / per channel (μ, σ), static per channel with a scale per token "
                        "(channel-token), or dynamic min–max per channel over groups of tokens (default channel-group)")
    c.add_argument("--group", type=int, help="tokens per group for --norm channel-group (default 64)")
    c.add_argument("--sink", type=int, help="first tokens of each sequence kept exact (default 1)")
    c.add_argument("--outliers", type=float,
                   help="fraction of the entries of each (head, group) block kept exact with their positions "
                        "(dense-and-sparse; --norm channel-group only; default 0)")
    c.add_argument("--rope", choices=["post", "pre"],
                   help="quantize q and k after the rotary embedding, or before it (undone and redone inside "
                        "attention; the KV cache stores them before the rotation; default pre)")
    c.add_argument("--budget", type=float,
                   help="average code bits per query/key entry, spread over (layer, head, channel) by reverse "
                        "water-filling on the calibrated diagonal-Fisher loss estimate; each channel gets 2, 3, 4, 5, 8, … "
                        "levels (3 and 5 packed at 1.6 and 2.33 bits), at most 2^--bits-q / 2^--bits-k (--norm "
                        "channel-group only; replaces the default --effective-bits)")
    c.add_argument("--effective-bits", type=float,
                   help="bits per entry (per key entry with --budget-sides k) with every bit counted — codes, group "
                        "scales, exact sink tokens and incomplete group at --seqlen: sets --budget to the code bits that "
                        "make exactly this many (e.g. 4 with --group 128 --scale-bits 8 --sink 1 at seqlen 2048: 3.867); "
                        "channels then get up to --bits-q/--bits-k bits, by default ⌈budget⌉ + 2 (default 3.65 for "
                        "--norm channel-group, keys only: with 4-bit values, 4.38 K/V bits held on average over a 2048-token "
                        "window of SmolLM2-135M in bf16, 3.97 at its end; "
                        "0 = off, every channel at --bits-q/--bits-k)")
    c.add_argument("--budget-sides", choices=["qk", "k"],
                   help="what the code budget is spread over: qk = queries and keys (the simulated Q·Kᵀ), k = the "
                        "keys alone (a KV cache with exact queries; --effective-bits then counts key entries; default k)")
    c.add_argument("--bits-v", type=int,
                   help="bits of the values the KV cache of these codebooks stores (make_cache's default; "
                        "0 = the keys' mean code bits; default 4)")
    c.add_argument("--scale-bits", type=int, choices=[16, 8],
                   help="bits of each stored per-group mid and half-range (--norm channel-group): 16 = fp16, "
                        "8 = log-coded half-range and offset in its 16ths (default 8 for --norm channel-group)")
    c.add_argument("--out", help="codebook file to write (.safetensors)")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval-ppl", help="perplexity, KL divergence from fp and top-token agreement: unquantized, "
                       "baselines and codebooks in one run")
    common(e)
    e.add_argument("--windows", type=int, help="evaluation windows, the FIRST N of the text (default 8)")
    e.add_argument("--codebooks", help="codebook file from `kvquant calibrate`")
    e.add_argument("--baselines", help=f"comma-separated rows (default {DEFAULTS['baselines']}); METHOD@B (e.g. "
                   "lambda@2): that codebook method rebuilt from --codebooks' statistics at exactly B effective bits; "
                   "fp is always run (first, per window): every row's KLD and top-1 are measured against it")
    e.add_argument("--mode", choices=["simulated", "generation"], default="simulated",
                   help="simulated: q and k quantized inside one forward pass per window (default); generation: "
                        "every token reads the keys (and values) a KV cache returns — fp through transformers' "
                        "DynamicCache, codebook rows through kvquant's cache, queries exact (see --queries)")
    e.add_argument("--bits-v", type=int, help="--mode generation: bits of the cached values (default: each row's /V, else the file's bits_v)")
    e.add_argument("--queries", type=int, metavar="B",
                   help="--mode generation: also run each codebook row with its queries quantized causally at B "
                        "bits on average (Codebooks.causal_queries(B) of --codebooks: static tables, transform-coded "
                        "in the Fisher-weighted eigenbasis, a per-token scale, levels allocated over components), "
                        "as rows 'ROW +qB'")
    e.add_argument("--values", choices=VALUE_CHOICES,
                   help="with --bits-v: values per token as asymmetric INT over head_dim with 8-bit mid/half "
                        "(minmax), the same of the row rotated by a Hadamard matrix (hadamard; the default where "
                        "head_dim is a power of two, else minmax) or v/RMS through the ρ = 0 codebook (rms)")
    e.add_argument("--json", help="write the rows to this JSON file")
    e.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even where the windows overlap the codebooks' calibration windows (same text); "
                        "the table is then labelled NOT HELD OUT (default: refused)")
    e.set_defaults(func=cmd_eval_ppl)

    k = sub.add_parser("eval-passkey", help="long-context retrieval (passkey) through each row's KV cache")
    k.add_argument("--config", help="YAML file of options (e.g. configs/default.yaml)")
    model_options(k)
    k.add_argument("--codebooks", help="codebook file from `kvquant calibrate`")
    k.add_argument("--baselines", help="comma-separated rows as in eval-ppl --mode generation (fp, the file's own "
                   "method, METHOD@K/V, kivi@B/V, quanto@B); fp is always run (default: fp and the file's own)")
    k.add_argument("--lengths", help="prompt lengths in tokens (default 1024, 2048, … up to the model's trained context)")
    k.add_argument("--depths", default="0,25,50,75,100", help="where the key sits, percent of the filler (default 0,25,50,75,100)")
    k.add_argument("--seeds", type=int, default=3, help="prompts (keys) per length and depth (default 3)")
    k.add_argument("--bits-v", type=int, help="bits of the cached values (default: each row's /V, else the file's)")
    k.add_argument("--values", choices=VALUE_CHOICES, help=VALUE_HELP)
    k.add_argument("--json", help="write accuracies and every answer to this JSON file")
    k.add_argument("--plots", help="folder for one accuracy heatmap (depth × length) PNG per row (the plot extra)")
    k.set_defaults(func=cmd_eval_passkey)

    g = sub.add_parser("generate", help="greedy continuation of a prompt through kvquant's quantized KV cache")
    g.add_argument("--codebooks", required=True, help="codebook file from `kvquant calibrate`")
    g.add_argument("--prompt", required=True, help="the text to continue")
    model_options(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--bits-v", type=int, help="bits of the cached values (default: the keys' mean code bits)")
    g.add_argument("--values", choices=VALUE_CHOICES, help=VALUE_HELP)
    g.add_argument("--prefill", choices=["sdpa", "int8"], default="sdpa",
                   help="the prompt's attention: sdpa (default) or int8 (Q·Kᵀ from INT8 codes, the CPU kernel)")
    g.set_defaults(func=cmd_generate)
    return ap
