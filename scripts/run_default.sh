#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv (scripts/setup.sh), fetch the offline default
# model and text, calibrate the default codebooks (configs/default.yaml: exactly 4 effective bits,
# 8 calibration windows from the end of the text), then one perplexity table on the first 4
# windows: unquantized, the best INT baseline at 4 and 2 bits (per channel, groups of 128) and the
# density codebooks at exactly 4 and 2 effective bits (the 2-bit rows rebuilt from the same
# statistics, as `kvquant calibrate --config configs/2bit.yaml` would build them), with the uniform
# codebook at 2 bits beside them. About 10 minutes on 2 cores. Extra arguments go to `kvquant eval-ppl`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/kvquant assets smollm2-135m enwiki-excerpt
.venv/bin/kvquant calibrate --config configs/default.yaml --out out/default.safetensors
.venv/bin/kvquant eval-ppl --config configs/default.yaml --codebooks out/default.safetensors --windows 4 \
  --baselines fp,int4-channel,int2-channel,lambda-lloyd,lambda@2,uniform@2 --json out/ppl_main.json "$@"
