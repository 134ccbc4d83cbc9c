#!/usr/bin/env bash
# Create .venv and install sgarc. torch==2.13.0 goes first so pip takes the CPU build on disk
# instead of pulling CUDA packages for a newer release.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
