#!/usr/bin/env bash
# Create the project's virtualenv .venv (once) with CPU torch pinned first — plain `torch` would
# pull several GB of CUDA wheels — then kvquant with its test, GGUF and lm-eval extras.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# takes the CPU-only torch wheel from PyTorch's own index, for machines where PyPI's
# torch==2.13.0 would be the CUDA build (on these project machines PyPI serves the CPU build).
# KVQUANT_TRANSFORMERS=5.17.0 installs that transformers version instead of the newest allowed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/kvquant ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  .venv/bin/python -m pip install -q -e ".[dev,gguf,lm-eval]"
fi
if [ -n "${KVQUANT_TRANSFORMERS:-}" ]; then
  .venv/bin/python -m pip install -q "transformers==$KVQUANT_TRANSFORMERS"
fi
