#!/usr/bin/env bash
# The test suite in the project's virtualenv (created by scripts/setup.sh if missing), from any
# shell: no activation needed. Extra arguments go to pytest, e.g. -m "not integration".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/platform_info.py
exec .venv/bin/python -m pytest -q "$@"
