#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv (scripts/setup.sh), fetch the offline default
# model and text, calibrate the default codebooks (configs/default.yaml: the deployed KV cache at
# 4 bits per K/V entry held at a window's end, 4.4 on average; 8 calibration windows from the end of the text), then one
# generation-mode perplexity table on the first 4 windows — every token reads the KV cache:
# unquantized (DynamicCache), kvquant's cache at 4 and 2 bits per K/V entry held (the 2-bit row
# rebuilt from the same statistics, as `kvquant calibrate --config configs/2bit.yaml` would build
# it), the KIVI-style INT cache at 4 and 2 bits and transformers' quanto cache at 4 bits.
# About 10 minutes on 2 cores, in the dtype the model ships in (bfloat16) on a CPU with bfloat16 instructions
# (AVX-512 BF16, AMX); on an AVX2-only CPU in float32, with a warning (--dtype). Extra arguments go to `kvquant eval-ppl`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/kvquant assets smollm2-135m enwiki-excerpt
.venv/bin/kvquant calibrate --config configs/default.yaml --out out/default.safetensors
.venv/bin/kvquant eval-ppl --config configs/default.yaml --codebooks out/default.safetensors --windows 4 \
  --mode generation --baselines fp,lambda-lloyd,lambda-lloyd@1.65/2,kivi@4/4,kivi@2/2,quanto@4 \
  --json out/ppl_main.json "$@"
