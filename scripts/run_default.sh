#!/usr/bin/env bash
# Set up (virtualenv, CPU torch, kvquant) and run the main job on the default offline model
# and text: calibrate codebooks, then the perplexity table with the baselines, in one run.
# Options come from configs/default.yaml; extra arguments go to `kvquant eval-ppl`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/kvquant ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev,gguf]"
fi
. .venv/bin/activate
mkdir -p out
kvquant assets smollm2-135m enwiki-excerpt
kvquant calibrate --config configs/default.yaml --out out/default.safetensors
kvquant eval-ppl --config configs/default.yaml --codebooks out/default.safetensors --json out/ppl_default.json "$@"
