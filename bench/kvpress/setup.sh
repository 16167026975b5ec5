#!/usr/bin/env bash
# Create .venv-kvpress: kvpress 0.5.5's own environment (transformers < 5.3), separate from headwise's .venv
# (transformers >= 5.3). CPU torch first, on its own, pinned like the main Makefile (constraints.txt), so that
# pip does not pull a multi-GB CUDA build; then bench/kvpress/requirements.txt.
# Usage: bench/kvpress/setup.sh [VENV_DIR]   (default .venv-kvpress at the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-kvpress}"
PYTHON="${PYTHON:-python3.11}"
TORCH_PIN="$(grep -E '^torch==' "$ROOT/constraints.txt")"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Where the CPU build is not on a local find-links, add: --index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -m pip install -q "$TORCH_PIN"
"$VENV/bin/python" -m pip install -q -r "$ROOT/bench/kvpress/requirements.txt"
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress env:', 'transformers', transformers.__version__, 'torch', torch.__version__)"
